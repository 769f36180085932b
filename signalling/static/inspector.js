/*
 * OpenConsult session inspector (signalling/static/inspector.html, also served at /inspector).
 *
 * Support staff paste a session id (or open /inspector?session=<id>) and a support or admin
 * token; the page reads
 *   GET /api/sessions/{id}/diagnosis  the findings: cause, participant, direction, time, next step
 *   GET /api/sessions/{id}/summary    meeting stats, participants with scores, error log
 *   GET /api/sessions/{id}/events     the session's event log
 *   GET /api/sessions/{id}/quality    the quality samples (per publisher / subscriber track)
 *   GET /api/sessions?since_ms=…&until_ms=…&room=…&name=…&session_id=…&q=…   the search
 * with `Authorization: Bearer <token>` and shows the diagnosis on top, meeting stats, the
 * participants (browser, OS and device as the server parsed them), the error log, quality charts
 * (inline SVG) with the events as markers and a zoom on a time range, and a filterable event log.
 *
 * The page only renders: the diagnosis, scores and failure counts come from the server. A server
 * without the diagnosis or summary routes (404) gets "not available" in those panels, and the
 * older client-side meeting stats and warnings stand in.
 *
 * Everything that comes from the server (names, texts, payloads) is written with textContent
 * or setAttribute, never parsed as HTML: names and texts are user-supplied.
 *
 * The token is kept in sessionStorage (this tab only) and never put in the URL.
 *
 * For tests the page exposes `window.inspector`:
 *   inspector.state     'idle' | 'loading' | 'loaded' | 'empty' | 'error'
 *   inspector.error     {status, code, message} of the last failure, or null
 *   inspector.sessionId the session shown
 *   inspector.events / inspector.samples   what the API returned
 *   inspector.stats     {users, connections, streams, subscribers, streamedMinutes, ...}
 *   inspector.warnings  [{level, text}] (only shown while the server has no diagnosis)
 *   inspector.diagnosis {available, findings, reason} / inspector.summary {available, data, reason}
 *   inspector.markers   how many event markers the charts show; inspector.zoom {from, until} or null
 *   inspector.load(sessionId) / inspector.search(text | {since, until, room, name, sessionId, text})
 *   inspector.zoomTo(fromMs, untilMs) / inspector.resetZoom()
 */
(function () {
  'use strict';

  const TOKEN_KEY = 'openconsult.inspector.token';
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const $ = (id) => document.getElementById(id);

  const inspector = {
    state: 'idle',
    error: null,
    sessionId: null,
    events: [],
    samples: [],
    stats: null,
    warnings: [],
    verdict: '',
    diagnosis: { available: false, findings: [], reason: '' },
    summary: { available: false, data: null, reason: '' },
    markers: 0,
    zoom: null,
    load: load,
    search: search,
    zoomTo: zoomTo,
    resetZoom: resetZoom,
  };
  window.inspector = inspector;

  // ---- small DOM helpers (text only, never HTML) -------------------------------------------

  function el(tag, options, children) {
    const node = document.createElement(tag);
    const opts = options || {};
    if (opts.className) node.className = opts.className;
    if (opts.text !== undefined && opts.text !== null) node.textContent = String(opts.text);
    if (opts.title) node.title = opts.title;
    if (opts.attrs) {
      for (const [name, value] of Object.entries(opts.attrs)) node.setAttribute(name, String(value));
    }
    for (const child of children || []) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function setStatus(state, text) {
    inspector.state = state;
    const line = $('status');
    line.dataset.state = state;
    line.textContent = text;
  }

  // ---- formatting --------------------------------------------------------------------------

  const pad = (n, width) => String(n).padStart(width || 2, '0');

  function localTime(ms, withMs) {
    const d = new Date(ms);
    const base = pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
    return withMs ? base + '.' + pad(d.getMilliseconds(), 3) : base;
  }

  function localDate(ms) {
    const d = new Date(ms);
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate());
  }

  function utc(ms) {
    return new Date(ms).toISOString().replace('T', ' ').replace('Z', ' UTC');
  }

  function duration(ms) {
    if (ms === null || ms === undefined || !isFinite(ms)) return '—';
    const totalSeconds = Math.max(0, Math.round(ms / 1000));
    if (ms < 10000) return (Math.max(0, ms) / 1000).toFixed(1) + 's';
    const h = Math.floor(totalSeconds / 3600);
    const m = Math.floor((totalSeconds % 3600) / 60);
    const s = totalSeconds % 60;
    if (h > 0) return h + 'h' + pad(m) + 'm' + pad(s) + 's';
    if (m > 0) return m + 'm' + pad(s) + 's';
    return s + 's';
  }

  function plural(n, word) {
    return n + ' ' + word + (n === 1 ? '' : 's');
  }

  // ---- API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function token() {
    return $('support-token').value.trim();
  }

  async function api(path) {
    let response;
    try {
      response = await fetch(path, {
        headers: { Authorization: 'Bearer ' + token(), Accept: 'application/json' },
        cache: 'no-store',
      });
    } catch (err) {
      throw new ApiError(0, 'network', 'Could not reach the server: ' + err.message);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const error = (body && body.error) || {};
      throw new ApiError(response.status, error.code || 'http_' + response.status,
                         error.message || response.statusText || 'HTTP ' + response.status);
    }
    return body;
  }

  /** An optional route: its body, or {unavailable: reason} when the server has no such route (404). */
  async function optionalApi(path) {
    try {
      return await api(path);
    } catch (err) {
      if (err.status === 404) return { unavailable: 'not available on this server' };
      return { unavailable: explain(err) };
    }
  }

  function explain(err) {
    if (err.status === 401 || err.status === 403) {
      return 'This token is not a support/admin token (' + err.message + ' [' + err.code + ']).';
    }
    if (err.status === 0) return err.message;
    return 'The server answered ' + err.status + ': ' + err.message + ' [' + err.code + ']';
  }

  // ---- load one session --------------------------------------------------------------------

  let loadSeq = 0;

  async function load(sessionId) {
    const id = String(sessionId || '').trim();
    const seq = ++loadSeq;
    inspector.error = null;
    if (!id) {
      setStatus('error', 'Enter a session id.');
      return;
    }
    if (!token()) {
      setStatus('error', 'Paste a support or admin token first.');
      $('support-token').focus();
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token());
    $('session').value = id;
    const url = new URL(window.location.href);
    url.searchParams.set('session', id);
    window.history.replaceState(null, '', url.pathname + url.search);
    inspector.sessionId = id;
    setStatus('loading', 'Loading session ' + id + '…');
    const path = '/api/sessions/' + encodeURIComponent(id);
    let events;
    let quality;
    let diagnosis;
    let summary;
    try {
      [events, quality, diagnosis, summary] = await Promise.all([
        api(path + '/events'), api(path + '/quality'), optionalApi(path + '/diagnosis'), optionalApi(path + '/summary'),
      ]);
    } catch (err) {
      if (seq !== loadSeq) return;
      inspector.error = { status: err.status || 0, code: err.code || 'error', message: err.message };
      $('report').hidden = true;
      setStatus('error', explain(err));
      return;
    }
    if (seq !== loadSeq) return;
    inspector.events = events.events || [];
    inspector.samples = (quality && quality.samples) || [];
    inspector.diagnosis = diagnosis.unavailable
      ? { available: false, findings: [], reason: diagnosis.unavailable }
      : { available: true, findings: Array.isArray(diagnosis.findings) ? diagnosis.findings : [], reason: '' };
    inspector.summary = summary.unavailable
      ? { available: false, data: null, reason: summary.unavailable }
      : { available: true, data: summary, reason: '' };
    inspector.zoom = null;
    if (inspector.events.length === 0) {
      $('report').hidden = true;
      setStatus('empty', 'No events for this session id (' + id + '). Check the id, or search below.');
      return;
    }
    render(inspector.events, inspector.samples, Date.now());
    $('report').hidden = false;
    setStatus('loaded', 'Session ' + id + ': ' + plural(inspector.events.length, 'event') + ', ' +
              plural(inspector.samples.length, 'quality sample') + '. Loaded at ' + localTime(Date.now()) + '.');
  }

  // ---- the model: participants, streams, stats, warnings -----------------------------------

  function model(events, samples, nowMs) {
    const connections = new Map(); // connection id → participant
    const streams = new Map(); // stream id → stream
    const subscriptions = new Set();
    const warnings = [];
    const warned = new Set();
    const warn = (level, text) => {
      if (!warned.has(text)) {
        warned.add(text);
        warnings.push({ level: level, text: text });
      }
    };
    let tokenRejections = 0;

    for (const ev of events) {
      const p = ev.payload || {};
      if (ev.kind === 'serverDetectedConnect' && ev.connection_id) {
        connections.set(ev.connection_id, {
          id: ev.connection_id, name: p.name || ev.connection_id, role: p.role || '', user: p.user || '',
          userAgent: p.user_agent || '', ip: p.ip || '', joinedMs: ev.time_ms, leftMs: null, reason: null,
          streams: [], browser: p.browser || '', os: p.os || '', device: p.device || '', sdk: p.sdk_version || '',
        });
      }
    }
    const nameOf = (cid) => {
      const c = connections.get(cid);
      return c ? c.name : cid;
    };

    for (const ev of events) {
      const p = ev.payload || {};
      const who = ev.connection_id ? nameOf(ev.connection_id) : 'unknown';
      switch (ev.kind) {
        case 'streamCreated':
          if (ev.stream_id && !streams.has(ev.stream_id)) {
            streams.set(ev.stream_id, {
              id: ev.stream_id, connectionId: ev.connection_id, name: p.name || who,
              hasAudio: !!p.has_audio, hasVideo: !!p.has_video, createdMs: ev.time_ms, destroyedMs: null,
            });
            const c = connections.get(ev.connection_id);
            if (c) c.streams.push(ev.stream_id);
          }
          break;
        case 'streamDestroyed': {
          const s = streams.get(ev.stream_id);
          if (s && s.destroyedMs === null) s.destroyedMs = ev.time_ms;
          break;
        }
        case 'subscribeSuccess':
          subscriptions.add(p.subscription_id || ev.connection_id + '/' + ev.stream_id);
          break;
        case 'disconnect': {
          const c = connections.get(ev.connection_id);
          if (c && c.leftMs === null) {
            c.leftMs = ev.time_ms;
            c.reason = p.reason || '';
          }
          if (p.reason === 'networkDisconnected') {
            warn('error', who + ' lost the connection (networkDisconnected: socket or ICE timeout)');
          }
          break;
        }
        case 'iceStateChanged':
        case 'dtlsStateChanged':
          if (p.state === 'failed') {
            const layer = ev.kind === 'iceStateChanged' ? 'ICE' : 'DTLS';
            warn('error', layer + ' failed for ' + who +
                 ' (a network problem between the client and the server\'s UDP ports)');
          }
          break;
        case 'publishFailure':
          warn('error', 'Publish failed for ' + who + ': ' + (p.error || ev.text));
          break;
        case 'subscribeFailure':
          warn('warn', 'Subscribe failed for ' + who + ': ' + ev.text);
          break;
        case 'tokenRejected':
          tokenRejections += 1;
          break;
        case 'qualityAlert':
          warn('warn', 'Quality alert for ' + who + ': ' + ev.text);
          break;
        default:
          break;
      }
    }

    const people = Array.from(connections.values());
    const names = new Set(people.map((c) => c.name));
    const live = people.some((c) => c.leftMs === null);
    const lastMs = events.length ? events[events.length - 1].time_ms : nowMs;

    let streamedMs = 0;
    for (const s of streams.values()) {
      const owner = connections.get(s.connectionId);
      let end = s.destroyedMs;
      if (end === null) end = owner && owner.leftMs !== null ? owner.leftMs : nowMs;
      streamedMs += Math.max(0, end - s.createdMs);
    }

    let callStart = null;
    let callEnd = null;
    if (people.length) {
      callStart = Math.min(...people.map((c) => c.joinedMs));
      callEnd = live ? nowMs : Math.max(...people.map((c) => c.leftMs));
    }

    // Time two or more participants were connected at once (a sweep over joins and leaves).
    const marks = [];
    for (const c of people) {
      marks.push([c.joinedMs, 1]);
      marks.push([c.leftMs === null ? nowMs : c.leftMs, -1]);
    }
    marks.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    let together = 0;
    let present = 0;
    let since = null;
    for (const [t, delta] of marks) {
      if (present >= 2 && since !== null) together += t - since;
      present += delta;
      since = t;
    }

    let firstMediaMs = null;
    for (const sample of samples) {
      if (sample.packets > 0 && (firstMediaMs === null || sample.time_ms < firstMediaMs)) {
        firstMediaMs = sample.time_ms;
      }
    }

    // Warnings support staff act on, most telling first.
    const front = [];
    if (people.length === 0) {
      front.push({ level: 'error', text: 'Nobody ever connected to this session' +
                   (tokenRejections ? ' (' + plural(tokenRejections, 'token') + ' rejected)' : '') });
    } else if (people.length === 1) {
      front.push({ level: 'error', text: 'Only one participant ever connected (' + people[0].name +
                   '): the other never connected' });
    }
    const patients = people.filter((c) => c.role === 'patient');
    const clinicians = people.filter((c) => c.role === 'clinician');
    if (people.length && patients.length === 0 && clinicians.length > 0) {
      front.push({ level: 'error', text: 'Patient never connected' });
    }
    if (patients.length && patients.every((c) => c.streams.length === 0)) {
      front.push({ level: 'error', text: 'Patient never published' });
    }
    if (clinicians.length && clinicians.every((c) => c.streams.length === 0)) {
      front.push({ level: 'warn', text: 'Clinician never published' });
    }
    if (tokenRejections && people.length) {
      warn('warn', plural(tokenRejections, 'token') + ' rejected');
    }
    warnings.unshift(...front);

    for (const warning of qualityWarnings(samples, connections)) warn(warning.level, warning.text);

    const stats = {
      users: names.size,
      connections: people.length,
      streams: streams.size,
      subscribers: subscriptions.size,
      streamedMinutes: streamedMs / 60000,
      callMs: callStart === null ? null : callEnd - callStart,
      togetherMs: together,
      live: live,
      firstMs: events.length ? events[0].time_ms : null,
      lastMs: lastMs,
      timeToFirstMediaMs: firstMediaMs !== null && callStart !== null ? firstMediaMs - callStart : null,
    };
    return { connections: connections, streams: streams, stats: stats, warnings: warnings, nameOf: nameOf };
  }

  function qualityWarnings(samples, connections) {
    const out = [];
    const byTrack = new Map();
    for (const s of samples) {
      if (s.direction !== 'in' || s.kind !== 'video') continue;
      const key = s.connection_id + '|' + s.stream_id;
      if (!byTrack.has(key)) byTrack.set(key, []);
      byTrack.get(key).push(s);
    }
    for (const list of byTrack.values()) {
      if (list.length < 5) continue;
      const c = connections.get(list[0].connection_id);
      const who = c ? c.name : list[0].connection_id;
      const low = list.filter((s) => s.bitrate_kbps < 150).length / list.length;
      if (low >= 0.8) {
        out.push({ level: 'warn', text: 'Video bitrate from ' + who + ' stayed under 150 kbps for ' +
                   Math.round(low * 100) + '% of the call' });
      }
      const sent = list.reduce((n, s) => n + (s.packets || 0) + (s.packets_lost || 0), 0);
      const lost = list.reduce((n, s) => n + (s.packets_lost || 0), 0);
      if (sent > 0 && lost / sent > 0.05) {
        out.push({ level: 'warn', text: 'Video from ' + who + ' lost ' + (100 * lost / sent).toFixed(1) +
                   '% of its packets' });
      }
    }
    return out;
  }

  // ---- rendering ---------------------------------------------------------------------------

  let lastModel = null;

  function render(events, samples, nowMs) {
    const m = model(events, samples, nowMs);
    lastModel = m;
    inspector.stats = m.stats;
    inspector.warnings = inspector.diagnosis.available ? [] : m.warnings;
    renderDiagnosis(inspector.diagnosis, m);
    renderSummary(m);
    renderParticipants(m);
    renderErrors(inspector.summary, m);
    renderCharts(samples, m);
    renderEvents(events, m);
  }

  // ---- diagnosis (from the server) ---------------------------------------------------------

  const DIRECTIONS = { send: 'sending', recv: 'receiving' };

  function timeRange(fromMs, untilMs) {
    if (typeof fromMs !== 'number') return '';
    if (typeof untilMs !== 'number' || untilMs <= fromMs) return localTime(fromMs);
    return localTime(fromMs) + '–' + localTime(untilMs) + ' (' + duration(untilMs - fromMs) + ')';
  }

  function renderDiagnosis(d, m) {
    const status = $('diagnosis-status');
    const list = $('findings');
    if (!d.available) {
      status.textContent = 'Diagnosis: ' + d.reason + '.';
      status.dataset.level = 'unavailable';
      list.replaceChildren();
      return;
    }
    const problems = d.findings.filter((f) => f.severity === 'problem').length;
    const warnings = d.findings.filter((f) => f.severity === 'warning').length;
    status.dataset.level = problems ? 'problem' : warnings ? 'warning' : 'ok';
    status.textContent = d.findings.length
      ? plural(problems, 'problem') + ', ' + plural(warnings, 'warning') + ', ' +
        plural(d.findings.length - problems - warnings, 'note') + '.'
      : 'No problems found in this session.';
    list.replaceChildren(...d.findings.map((f) => {
      const who = f.participant
        ? (f.participant.name || f.participant.connection_id) + (f.participant.role ? ' (' + f.participant.role + ')' : '')
        : '';
      const meta = [who, DIRECTIONS[f.direction] || '', timeRange(f.from_ms, f.until_ms)].filter(Boolean).join(' · ');
      const evidence = (f.evidence && Array.isArray(f.evidence.entries)) ? f.evidence.entries : [];
      const links = evidence.slice(0, 20).map((seq) => {
        const button = el('button', { className: 'link', text: '#' + seq,
                                      attrs: { type: 'button', 'data-seq': seq, title: 'Show this entry in the event log' } });
        button.addEventListener('click', () => showEntry(seq));
        return button;
      });
      const zoom = typeof f.from_ms === 'number' && typeof f.until_ms === 'number' && f.until_ms > f.from_ms
        ? el('button', { className: 'link', text: 'Zoom the charts to this', attrs: { type: 'button' } }) : null;
      if (zoom) zoom.addEventListener('click', () => zoomTo(f.from_ms, f.until_ms));
      return el('li', { className: 'finding', attrs: { 'data-severity': f.severity || 'info', 'data-type': f.type || '' } }, [
        el('p', { className: 'cause' }, [el('span', { className: 'severity', text: f.severity || 'info' }),
                                         el('span', { text: ' ' + (f.cause || f.type || '') })]),
        meta ? el('p', { className: 'meta muted', text: meta }) : null,
        f.next_step ? el('p', { className: 'next', text: 'Next step: ' + f.next_step }) : null,
        links.length || zoom
          ? el('p', { className: 'evidence muted' }, [links.length ? el('span', { text: 'Evidence: ' }) : null, ...links,
                                                      zoom ? el('span', { text: ' ' }) : null, zoom])
          : null,
      ]);
    }));
  }

  /** Scroll to an event-log entry (clearing filters that hide it) and flash it. */
  function showEntry(seq) {
    const row = document.getElementById('ev-' + seq);
    if (!row) return;
    if (row.hidden) {
      $('kind-filter').value = '';
      $('text-filter').value = '';
      applyFilter();
    }
    row.classList.add('flash');
    row.scrollIntoView({ block: 'center' });
    setTimeout(() => row.classList.remove('flash'), 2000);
  }

  // ---- error log (from the server's summary) -----------------------------------------------

  function renderErrors(summary, m) {
    const status = $('errors-status');
    const rates = $('error-rates');
    const log = $('error-log');
    const errors = summary.available && summary.data ? summary.data.errors : null;
    if (!errors) {
      status.textContent = 'Error log: ' + (summary.available ? 'the summary has none' : summary.reason) + '.';
      rates.replaceChildren();
      log.replaceChildren();
      return;
    }
    const rows = [['Connect', errors.connect], ['Publish', errors.publish], ['Subscribe', errors.subscribe]];
    rates.replaceChildren(...rows.map(([label, counts]) => {
      const attempts = (counts && counts.attempts) || 0;
      const failures = (counts && counts.failures) || 0;
      const rate = attempts ? Math.round((100 * failures) / attempts) + '% failed' : 'no attempts';
      return el('div', { className: 'stat' + (failures ? ' bad' : ''),
                         attrs: { 'data-stat': label.toLowerCase() + '-failures' } }, [
        el('dt', { text: label }),
        el('dd', { text: failures + ' of ' + attempts + ' · ' + rate }),
      ]);
    }));
    const entries = Array.isArray(errors.log) ? errors.log : [];
    status.textContent = entries.length ? plural(entries.length, 'error') + ':' : 'No errors.';
    log.replaceChildren(...entries.map((ev) => {
      const who = ev.connection_id ? m.nameOf(ev.connection_id) : '';
      const button = el('button', { className: 'link', text: localTime(ev.time_ms, true), title: utc(ev.time_ms),
                                    attrs: { type: 'button' } });
      button.addEventListener('click', () => showEntry(ev.seq));
      return el('li', { attrs: { 'data-kind': ev.kind || '' } }, [
        button, el('span', { className: 'kind', text: ' ' + (ev.kind || '') + ' ' }),
        who ? el('strong', { text: who + ': ' }) : null, el('span', { text: ev.text || '' }),
      ]);
    }));
  }

  function verdictText(stats) {
    const parts = [plural(stats.users, 'user') + ' connected', plural(stats.streams, 'stream')];
    if (stats.callMs !== null) {
      parts.push(stats.live ? 'call in progress for ' + duration(stats.callMs) : 'call lasted ' + duration(stats.callMs));
    }
    return parts.join(', ');
  }

  function renderSummary(m) {
    const stats = m.stats;
    $('report-session').textContent = inspector.sessionId;
    const d = inspector.diagnosis;
    const hasError = d.available ? d.findings.some((f) => f.severity === 'problem')
                                 : m.warnings.some((w) => w.level === 'error');
    const hasWarning = d.available ? d.findings.some((f) => f.severity === 'warning') : m.warnings.length > 0;
    inspector.verdict = verdictText(stats);
    const verdict = $('verdict');
    verdict.textContent = inspector.verdict;
    verdict.dataset.level = hasError ? 'error' : hasWarning ? 'warn' : 'ok';

    const list = $('warnings');
    list.replaceChildren(...inspector.warnings.map((w) => el('li', { className: w.level, text: w.text })));
    list.hidden = inspector.diagnosis.available;

    const rows = [
      ['Users', stats.users, 'distinct display names'],
      ['Connections', stats.connections, 'signalling connections the server detected'],
      ['Streams', stats.streams, 'streams published'],
      ['Subscribers', stats.subscribers, 'successful subscriptions'],
      ['Streamed minutes', stats.streamedMinutes.toFixed(1), 'sum over streams of created → destroyed (or now)'],
      ['Call', stats.callMs === null ? '—' : duration(stats.callMs) + (stats.live ? ' (live)' : ''),
       'first connect → last disconnect'],
      ['Together', stats.togetherMs ? duration(stats.togetherMs) : '—', 'time two or more were connected at once'],
      ['First media', stats.timeToFirstMediaMs === null ? '—' : duration(stats.timeToFirstMediaMs),
       'first connect → first quality sample carrying packets (sampled every few seconds)'],
    ];
    const when = $('report-when');
    when.textContent = stats.firstMs === null ? '' : localDate(stats.firstMs) + ' ' + localTime(stats.firstMs) +
      ' – ' + localTime(stats.lastMs) + ' (local time)';
    when.title = stats.firstMs === null ? '' : utc(stats.firstMs) + ' – ' + utc(stats.lastMs);
    $('stats').replaceChildren(...rows.map(([label, value, help]) =>
      el('div', { className: 'stat', title: help, attrs: { 'data-stat': label.toLowerCase().replace(/ /g, '-') } }, [
        el('dt', { text: label }),
        el('dd', { text: value }),
      ])));
  }

  function scoresText(scores) {
    if (!scores) return '—';
    const parts = [];
    if (typeof scores.audio_mos === 'number') parts.push('MOS ' + scores.audio_mos.toFixed(1));
    if (scores.video_level !== undefined && scores.video_level !== null) parts.push('video ' + scores.video_level);
    if (typeof scores.freezes === 'number') parts.push(plural(scores.freezes, 'freeze'));
    if (typeof scores.time_to_first_media_ms === 'number') parts.push('first media ' + duration(scores.time_to_first_media_ms));
    return parts.length ? parts.join(' · ') : '—';
  }

  function publishedText(m, connectionId) {
    const c = m.connections.get(connectionId);
    if (!c) return '';
    return c.streams.map((sid) => {
      const s = m.streams.get(sid);
      return [s.hasAudio ? 'audio' : '', s.hasVideo ? 'video' : ''].filter(Boolean).join('+') || 'stream';
    }).join(', ');
  }

  /** The user table: the server's summary when it has one, else the connect entries as they are. */
  function renderParticipants(m) {
    const body = $('participants').tBodies[0];
    const summary = inspector.summary.available && inspector.summary.data ? inspector.summary.data : null;
    const people = summary && Array.isArray(summary.participants)
      ? summary.participants.map((p) => ({
        id: p.connection_id, name: p.name || p.connection_id, role: p.role || '', user: p.user || '',
        joinedMs: p.joined_ms, leftMs: typeof p.left_ms === 'number' ? p.left_ms : null, reason: p.reason || '',
        browser: p.browser || '', os: p.os || '', device: p.device || '', ip: p.ip || '', sdk: p.sdk_version || '',
        userAgent: p.user_agent || '', scores: scoresText(p.scores),
      }))
      : Array.from(m.connections.values()).map((c) => Object.assign({}, c, { scores: '—' }));
    const rows = people.map((c) => {
      const published = publishedText(m, c.id);
      return el('tr', { attrs: { 'data-connection': c.id } }, [
        el('td', { text: c.name, title: c.id + (c.user ? ' · user ' + c.user : '') }),
        el('td', { text: c.role || '—' }),
        el('td', { text: typeof c.joinedMs === 'number' ? localTime(c.joinedMs) : '—',
                   title: typeof c.joinedMs === 'number' ? utc(c.joinedMs) : '' }),
        el('td', c.leftMs === null ? { text: 'still connected', className: 'muted' }
                                 : { text: localTime(c.leftMs) + ' · ' + (c.reason || '?'), title: utc(c.leftMs) }),
        el('td', { text: published || 'never', className: published ? '' : 'bad' }),
        el('td', { className: 'browser', text: c.browser || '—', title: c.userAgent || '' }),
        el('td', { className: 'os', text: c.os || '—' }),
        el('td', { className: 'device', text: c.device || '—' }),
        el('td', { text: c.ip || '—' }),
        el('td', { className: 'sdk', text: c.sdk || '—' }),
        el('td', { className: 'scores', text: c.scores }),
      ]);
    });
    if (!rows.length) rows.push(el('tr', {}, [el('td', { text: 'Nobody connected.', attrs: { colspan: 11 } })]));
    body.replaceChildren(...rows);
  }

  // ---- charts ------------------------------------------------------------------------------

  const METRICS = [
    { key: 'bitrate_kbps', title: 'Bitrate', unit: 'kbps' },
    { key: 'loss_pct', title: 'Packet loss', unit: '%' },
    { key: 'jitter_ms', title: 'Jitter', unit: 'ms' },
    { key: 'rtt_ms', title: 'Round-trip time', unit: 'ms' },
    { key: 'frame_rate', title: 'Frame rate', unit: 'fps' },
  ];
  const COLORS = ['#0b63ce', '#c2410c', '#15803d', '#7e22ce', '#b91c1c', '#0e7490', '#a16207', '#be185d',
                  '#4d7c0f', '#1e40af'];
  const W = 560;
  const H = 210;
  const M = { left: 50, right: 14, top: 12, bottom: 30 };
  const hiddenTracks = new Set();

  function tracksOf(samples, m) {
    const tracks = new Map();
    for (const s of samples) {
      const key = [s.connection_id, s.direction, s.kind, s.stream_id].join('|');
      if (!tracks.has(key)) {
        const who = m.nameOf(s.connection_id);
        const c = m.connections.get(s.connection_id);
        const stream = m.streams.get(s.stream_id);
        const from = stream ? m.nameOf(stream.connectionId) : s.stream_id;
        const label = s.direction === 'in'
          ? who + (c && c.role ? ' (' + c.role + ')' : '') + ' · sends ' + s.kind
          : who + (c && c.role ? ' (' + c.role + ')' : '') + ' · receives ' + s.kind + ' from ' + from;
        tracks.set(key, { key: key, label: label, who: who, direction: s.direction, kind: s.kind, samples: [] });
      }
      tracks.get(key).samples.push(s);
    }
    const list = Array.from(tracks.values());
    list.sort((a, b) => a.who.localeCompare(b.who) || a.direction.localeCompare(b.direction) ||
                        b.kind.localeCompare(a.kind) || a.key.localeCompare(b.key));
    list.forEach((t, i) => {
      t.color = COLORS[i % COLORS.length];
      t.dash = t.kind === 'audio' ? '5 3' : '';
      t.samples.sort((a, b) => a.time_ms - b.time_ms);
    });
    return list;
  }

  /** A y scale from 0: a round step (1, 2, 2.5 or 5 × 10^k) and at most 5 steps up to the max. */
  function niceScale(value) {
    if (!(value > 0)) return { max: 1, step: 0.25 };
    const exp = Math.pow(10, Math.floor(Math.log10(value / 5)));
    for (const factor of [1, 2, 2.5, 5, 10]) {
      const step = factor * exp;
      if (value / step <= 5) return { max: Math.ceil(value / step - 1e-9) * step, step: step };
    }
    return { max: 10 * exp * 5, step: 10 * exp };
  }

  function formatTick(value) {
    if (value >= 1000) return (value / 1000).toFixed(value % 1000 === 0 ? 0 : 1) + 'k';
    return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(3)));
  }

  function renderCharts(samples, m) {
    const charts = $('charts');
    const legend = $('legend');
    $('quality-empty').hidden = samples.length > 0;
    if (!samples.length) {
      charts.replaceChildren();
      legend.replaceChildren();
      return;
    }
    const tracks = tracksOf(samples, m);
    let t0 = Infinity;
    let t1 = -Infinity;
    for (const s of samples) {
      t0 = Math.min(t0, s.time_ms - (s.interval_s || 0) * 1000);
      t1 = Math.max(t1, s.time_ms);
    }
    const markers = inspector.events.filter(isMarker);
    for (const ev of markers) {
      t0 = Math.min(t0, ev.time_ms);
      t1 = Math.max(t1, ev.time_ms);
    }
    if (t1 - t0 < 1000) t1 = t0 + 1000;
    if (inspector.zoom) {
      t0 = Math.max(t0, inspector.zoom.from);
      t1 = Math.min(t1, inspector.zoom.until);
      if (t1 - t0 < 1000) t1 = t0 + 1000;
    }
    const shown = markers.filter((ev) => ev.time_ms >= t0 && ev.time_ms <= t1);
    inspector.markers = shown.length;
    $('zoom-reset').hidden = !inspector.zoom;
    $('zoom-range').textContent = (inspector.zoom ? 'Zoomed to ' : 'Whole call: ') + localTime(t0) + '–' +
      localTime(t1) + ' (' + duration(t1 - t0) + '), ' + plural(shown.length, 'event marker') + '.';

    legend.replaceChildren(...tracks.map((t) => {
      const swatch = svg('svg', { width: 26, height: 10, 'aria-hidden': 'true' });
      swatch.append(svg('line', { x1: 1, y1: 5, x2: 25, y2: 5, stroke: t.color, 'stroke-width': 3,
                                  'stroke-dasharray': t.dash }));
      const button = el('button', { attrs: { type: 'button', 'aria-pressed': String(!hiddenTracks.has(t.key)),
                                             'data-track': t.key } }, [swatch, el('span', { text: t.label })]);
      button.addEventListener('click', () => {
        if (hiddenTracks.has(t.key)) hiddenTracks.delete(t.key);
        else hiddenTracks.add(t.key);
        applyHidden();
      });
      return el('li', {}, [button]);
    }));

    charts.replaceChildren(...METRICS.map((metric) => chart(metric, tracks, t0, t1, shown, m)));
    applyHidden();
  }

  // ---- event markers and zoom --------------------------------------------------------------

  const MARKER_KINDS = new Set(['serverDetectedConnect', 'disconnect', 'streamCreated', 'streamDestroyed',
                                'publishFailure', 'subscribeFailure', 'tokenRejected', 'qualityAlert', 'clientEvent',
                                'Consultation', 'Queue', 'nodeFailure']);

  function isMarker(ev) {
    if (MARKER_KINDS.has(ev.kind)) return true;
    return (ev.kind === 'iceStateChanged' || ev.kind === 'dtlsStateChanged') && (ev.payload || {}).state === 'failed';
  }

  function zoomTo(fromMs, untilMs) {
    const from = Number(fromMs);
    const until = Number(untilMs);
    if (!isFinite(from) || !isFinite(until) || until <= from) return;
    inspector.zoom = { from: from, until: until };
    if (lastModel) renderCharts(inspector.samples, lastModel);
  }

  function resetZoom() {
    inspector.zoom = null;
    if (lastModel) renderCharts(inspector.samples, lastModel);
  }

  /** Drag across a chart to zoom to that time range. */
  function brush(root, t0, t1) {
    const plotW = W - M.left - M.right;
    const toTime = (clientX) => {
      const box = root.getBoundingClientRect();
      const x = ((clientX - box.left) * W) / Math.max(1, box.width);
      return t0 + ((Math.min(Math.max(x, M.left), W - M.right) - M.left) / plotW) * (t1 - t0);
    };
    const toX = (ms) => M.left + ((ms - t0) / (t1 - t0)) * plotW;
    let start = null;
    const band = svg('rect', { class: 'brush', x: 0, y: M.top, width: 0, height: H - M.top - M.bottom });
    band.style.display = 'none';
    root.append(band);
    root.addEventListener('pointerdown', (event) => {
      start = toTime(event.clientX);
      band.style.display = '';
      band.setAttribute('x', toX(start));
      band.setAttribute('width', 0);
      root.setPointerCapture(event.pointerId);
    });
    root.addEventListener('pointermove', (event) => {
      if (start === null) return;
      const now = toTime(event.clientX);
      band.setAttribute('x', toX(Math.min(start, now)));
      band.setAttribute('width', Math.abs(toX(now) - toX(start)));
    });
    root.addEventListener('pointerup', (event) => {
      if (start === null) return;
      const end = toTime(event.clientX);
      const from = Math.min(start, end);
      const until = Math.max(start, end);
      start = null;
      band.style.display = 'none';
      // A click (or a tiny drag) is not a zoom.
      if (until - from >= (t1 - t0) / 100 && until - from >= 500) zoomTo(from, until);
    });
  }

  function applyHidden() {
    for (const node of document.querySelectorAll('#charts [data-track], #legend [data-track]')) {
      const off = hiddenTracks.has(node.getAttribute('data-track'));
      if (node.tagName.toLowerCase() === 'button') node.setAttribute('aria-pressed', String(!off));
      else node.classList.toggle('off', off);
    }
  }

  function chart(metric, tracks, t0, t1, markers, m) {
    const plotW = W - M.left - M.right;
    const plotH = H - M.top - M.bottom;
    let max = 0;
    let any = false;
    for (const t of tracks) {
      for (const s of t.samples) {
        const v = s[metric.key];
        if (s.time_ms >= t0 && s.time_ms <= t1 && typeof v === 'number' && isFinite(v)) {
          any = true;
          max = Math.max(max, v);
        }
      }
    }
    const scale = niceScale(max);
    const yMax = scale.max;
    const x = (ms) => M.left + ((ms - t0) / (t1 - t0)) * plotW;
    const y = (v) => M.top + plotH - (Math.min(v, yMax) / yMax) * plotH;

    const root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', class: 'chart-svg',
                              'data-metric': metric.key,
                              'aria-label': metric.title + ' (' + metric.unit + ') over time, one line per track' });
    const grid = svg('g', { class: 'grid' });
    const steps = Math.round(yMax / scale.step);
    for (let i = 0; i <= steps; i++) {
      const value = scale.step * i;
      const yy = y(value);
      grid.append(svg('line', { x1: M.left, x2: W - M.right, y1: yy, y2: yy }));
      grid.append(svg('text', { x: M.left - 6, y: yy + 4, 'text-anchor': 'end' }, formatTick(value)));
    }
    const ticks = 5;
    for (let i = 0; i <= ticks; i++) {
      const ms = t0 + ((t1 - t0) * i) / ticks;
      const xx = x(ms);
      grid.append(svg('line', { x1: xx, x2: xx, y1: M.top + plotH, y2: M.top + plotH + 4 }));
      grid.append(svg('text', { x: xx, y: H - 10, 'text-anchor': i === 0 ? 'start' : i === ticks ? 'end' : 'middle' },
                      localTime(ms)));
    }
    grid.append(svg('line', { class: 'axis', x1: M.left, x2: W - M.right, y1: M.top + plotH, y2: M.top + plotH }));
    root.append(grid);

    if (!any) {
      root.append(svg('text', { x: M.left + plotW / 2, y: M.top + plotH / 2, 'text-anchor': 'middle',
                                class: 'nodata' }, 'No ' + metric.title.toLowerCase() + ' data'));
    }

    const marks = svg('g', { class: 'markers' });
    for (const ev of markers) {
      const xx = x(ev.time_ms).toFixed(1);
      const who = ev.connection_id ? m.nameOf(ev.connection_id) + ': ' : '';
      const line = svg('line', { class: 'marker ' + severity(ev), x1: xx, x2: xx, y1: M.top, y2: M.top + plotH,
                                 'data-kind': ev.kind, 'data-seq': ev.seq });
      line.append(svg('title', {}, localTime(ev.time_ms, true) + ' ' + ev.kind + ' · ' + who + (ev.text || '')));
      marks.append(line);
    }
    root.append(marks);

    for (const t of tracks) {
      const group = svg('g', { 'data-track': t.key });
      group.append(svg('title', {}, t.label));
      let segment = [];
      let prev = null;
      const flush = () => {
        if (segment.length >= 2) {
          group.append(svg('polyline', { points: segment.join(' '), fill: 'none', stroke: t.color,
                                         'stroke-width': 2, 'stroke-dasharray': t.dash,
                                         'stroke-linejoin': 'round', 'stroke-linecap': 'round' }));
        } else if (segment.length === 1) {
          const [cx, cy] = segment[0].split(',');
          group.append(svg('circle', { cx: cx, cy: cy, r: 2.5, fill: t.color }));
        }
        segment = [];
      };
      for (const s of t.samples) {
        if (s.time_ms < t0 || s.time_ms > t1) {
          flush();
          prev = null;
          continue;
        }
        const v = s[metric.key];
        const gap = prev && s.time_ms - prev.time_ms > 2.5 * Math.max(1, s.interval_s || 1) * 1000;
        if (typeof v !== 'number' || !isFinite(v) || gap) flush();
        if (typeof v === 'number' && isFinite(v)) {
          segment.push(x(s.time_ms).toFixed(1) + ',' + y(v).toFixed(1));
        }
        prev = s;
      }
      flush();
      root.append(group);
    }
    brush(root, t0, t1);
    return el('figure', { className: 'chart' }, [
      el('figcaption', {}, [el('strong', { text: metric.title }), el('span', { className: 'muted', text: ' ' + metric.unit })]),
      root,
    ]);
  }

  // ---- event log ---------------------------------------------------------------------------

  const BAD_KINDS = new Set(['publishFailure', 'subscribeFailure', 'tokenRejected', 'qualityAlert', 'nodeFailure']);
  const BAD_CLIENT_EVENTS = new Set(['getUserMediaFailed', 'iceFailed', 'connectionFailed', 'reconnecting']);
  let eventRows = [];

  function severity(ev) {
    const p = ev.payload || {};
    if (BAD_KINDS.has(ev.kind) || p.state === 'failed') return 'bad';
    if (ev.kind === 'clientEvent' && (BAD_CLIENT_EVENTS.has(p.event) ||
        (p.event === 'deviceCheck' && (p.camera !== 'ok' || p.microphone !== 'ok')))) return 'bad';
    if (ev.kind === 'disconnect' && p.reason && p.reason !== 'clientDisconnected') return 'bad';
    if (ev.kind === 'serverDetectedConnect' || ev.kind === 'streamCreated') return 'good';
    return '';
  }

  function renderEvents(events, m) {
    const multiDay = events.length && localDate(events[0].time_ms) !== localDate(events[events.length - 1].time_ms);
    eventRows = events.map((ev) => {
      const c = ev.connection_id ? m.connections.get(ev.connection_id) : null;
      const who = ev.connection_id ? m.nameOf(ev.connection_id) : '';
      const row = el('tr', { className: severity(ev), attrs: { 'data-kind': ev.kind, id: 'ev-' + ev.seq } });
      const time = el('time', { text: (multiDay ? localDate(ev.time_ms) + ' ' : '') + localTime(ev.time_ms, true),
                                title: utc(ev.time_ms), attrs: { datetime: new Date(ev.time_ms).toISOString() } });
      const toggle = el('button', { className: 'link', text: 'Show',
                                    attrs: { type: 'button', 'aria-expanded': 'false' } });
      row.append(
        el('td', { className: 'time' }, [time]),
        el('td', { className: 'who', title: ev.connection_id || '' },
           who ? [el('span', { text: who }), c && c.role ? el('span', { className: 'muted', text: ' ' + c.role }) : null]
               : [el('span', { className: 'muted', text: '—' })]),
        el('td', {}, [el('span', { className: 'kind', text: ev.kind })]),
        el('td', { className: 'muted', text: ev.component || '' }),
        el('td', { className: 'text', text: ev.text || '' }),
        el('td', {}, [toggle]),
      );
      const details = { seq: ev.seq, connection_id: ev.connection_id, stream_id: ev.stream_id, payload: ev.payload };
      let detailRow = null;
      toggle.addEventListener('click', () => {
        if (!detailRow) {
          detailRow = el('tr', { className: 'detail' }, [
            el('td', { attrs: { colspan: 6 } }, [el('pre', { text: JSON.stringify(details, null, 2) })]),
          ]);
          row.after(detailRow);
        } else {
          detailRow.hidden = !detailRow.hidden;
        }
        const open = !detailRow.hidden;
        toggle.textContent = open ? 'Hide' : 'Show';
        toggle.setAttribute('aria-expanded', String(open));
      });
      const haystack = [ev.kind, ev.component, ev.text, who, ev.connection_id, ev.stream_id,
                        JSON.stringify(ev.payload || {})].join(' ').toLowerCase();
      return { ev: ev, row: row, haystack: haystack, detail: () => detailRow };
    });
    $('events').tBodies[0].replaceChildren(...eventRows.map((r) => r.row));

    const counts = new Map();
    for (const ev of events) counts.set(ev.kind, (counts.get(ev.kind) || 0) + 1);
    const select = $('kind-filter');
    const keep = select.value;
    select.replaceChildren(el('option', { text: 'All kinds (' + events.length + ')', attrs: { value: '' } }),
      ...Array.from(counts.keys()).sort().map((kind) =>
        el('option', { text: kind + ' (' + counts.get(kind) + ')', attrs: { value: kind } })));
    select.value = counts.has(keep) ? keep : '';
    applyFilter();
  }

  function applyFilter() {
    const kind = $('kind-filter').value;
    const words = $('text-filter').value.toLowerCase().split(/\s+/).filter(Boolean);
    let shown = 0;
    for (const r of eventRows) {
      const visible = (!kind || r.ev.kind === kind) && words.every((w) => r.haystack.includes(w));
      r.row.hidden = !visible;
      const detail = r.detail();
      if (detail && !visible) detail.hidden = true;
      if (detail && visible) detail.hidden = r.row.querySelector('button').getAttribute('aria-expanded') !== 'true';
      if (visible) shown += 1;
    }
    $('event-count').textContent = 'Showing ' + shown + ' of ' + plural(eventRows.length, 'event') + '.';
  }

  // ---- search ------------------------------------------------------------------------------

  /** The search form's fields: dates as UTC ms (from the local-time inputs), texts trimmed. */
  function searchForm() {
    const when = (id) => {
      const value = $(id).value;
      const ms = value ? new Date(value).getTime() : NaN;
      return isFinite(ms) ? ms : null;
    };
    return {
      since: when('search-from'), until: when('search-until'), room: $('search-room').value.trim(),
      name: $('search-name').value.trim(), sessionId: $('search-session').value.trim(),
      text: $('search-text').value.trim(),
    };
  }

  async function search(criteria) {
    const c = typeof criteria === 'object' && criteria !== null ? criteria : { text: criteria || '' };
    const status = $('search-status');
    const results = $('search-results');
    if (!token()) {
      status.textContent = 'Paste a support or admin token first.';
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token());
    status.textContent = 'Searching…';
    results.replaceChildren();
    const query = new URLSearchParams();
    if (typeof c.since === 'number') query.set('since_ms', String(Math.max(0, Math.round(c.since))));
    if (typeof c.until === 'number') query.set('until_ms', String(Math.max(0, Math.round(c.until))));
    if (c.room) query.set('room', c.room);
    if (c.name) query.set('name', c.name);
    if (c.sessionId) query.set('session_id', c.sessionId);
    if (c.text) query.set('q', c.text);
    let found;
    try {
      found = (await api('/api/sessions?' + query.toString())).sessions || [];
    } catch (err) {
      status.textContent = explain(err);
      return;
    }
    status.textContent = found.length ? plural(found.length, 'session') + ' found, newest first.'
                                      : 'No sessions found.';
    results.replaceChildren(...found.map((s) => {
      const button = el('button', { className: 'link', text: s.session_id, attrs: { type: 'button' } });
      button.addEventListener('click', () => load(s.session_id));
      return el('li', {}, [
        button,
        el('span', { className: 'muted',
                     text: ' ' + localDate(s.first_ms) + ' ' + localTime(s.first_ms) + '–' + localTime(s.last_ms) +
                           ' · ' + plural(s.count, 'event'),
                     title: utc(s.first_ms) + ' – ' + utc(s.last_ms) }),
      ]);
    }));
  }

  // ---- wiring ------------------------------------------------------------------------------

  $('inspect-form').addEventListener('submit', (event) => {
    event.preventDefault();
    load($('session').value);
  });
  $('forget-token').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $('support-token').value = '';
    setStatus('idle', 'Token forgotten.');
  });
  $('search').addEventListener('click', () => search(searchForm()));
  for (const id of ['search-text', 'search-room', 'search-name', 'search-session']) {
    $(id).addEventListener('keydown', (event) => {
      if (event.key === 'Enter') {
        event.preventDefault();
        search(searchForm());
      }
    });
  }
  $('zoom-reset').addEventListener('click', resetZoom);
  $('kind-filter').addEventListener('change', applyFilter);
  $('text-filter').addEventListener('input', applyFilter);
  $('text-filter').addEventListener('change', applyFilter);

  const params = new URLSearchParams(window.location.search);
  const stored = sessionStorage.getItem(TOKEN_KEY);
  if (stored) $('support-token').value = stored;
  if (params.get('session')) {
    $('session').value = params.get('session');
    if (stored) load(params.get('session'));
  }
})();
