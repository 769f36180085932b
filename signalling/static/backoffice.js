/*
 * OpenConsult back-office log page: searches GET /api/backoffice/log with a staff token and
 * renders the rows as text (never as HTML); "Download CSV" fetches /api/backoffice/log.csv with the
 * same filters and saves it. The server decides what the token may see and audits every call.
 * The token is kept in sessionStorage (this tab only) and never put in the URL.
 */
(function () {
  'use strict';

  const TOKEN_KEY = 'openconsult.backoffice.token';
  const TYPES = ['Consultation', 'VideoSession', 'Queue', 'CallEnded', 'Login', 'LookUp',
                 'PatientToDoctorCall', 'DoctorToPatientCall', 'Chat', 'Error'];
  const LIMIT = 100;
  const $ = (id) => document.getElementById(id);
  let offset = 0;
  let finished = 0; // searches answered (or failed): data-done on #status, for tests and tools
  let pinnedUntil = null; // the server's window end of a new search: later pages and the CSV show the same rows

  function setStatus(state, text) {
    const el = $('status');
    el.dataset.state = state;
    el.textContent = text;
  }

  function utcMs(input) {
    // datetime-local has no zone: the page reads it as UTC, like the times it shows.
    return input.value ? Date.parse(input.value + ':00Z') : null;
  }

  function params(extra) {
    const p = new URLSearchParams();
    const since = utcMs($('since'));
    const until = utcMs($('until'));
    if (since !== null && !Number.isNaN(since)) p.set('since_ms', String(since));
    if (until !== null && !Number.isNaN(until)) p.set('until_ms', String(until));
    else if (pinnedUntil !== null) p.set('until_ms', String(pinnedUntil));
    const checked = TYPES.filter((t) => $('type-' + t).checked);
    if (checked.length && checked.length < TYPES.length) p.set('type', checked.join(','));
    const text = $('text').value.trim();
    if (text) p.set('q', text);
    for (const [k, v] of Object.entries(extra)) p.set(k, String(v));
    return p;
  }

  async function call(path) {
    const token = $('staff-token').value.trim();
    let response;
    try {
      response = await fetch(path, { headers: { Authorization: 'Bearer ' + token }, cache: 'no-store' });
    } catch (err) {
      throw new Error('Could not reach the server: ' + err.message);
    }
    if (!response.ok) {
      let message = 'HTTP ' + response.status;
      try {
        const body = await response.json();
        if (body && body.error) message = body.error.message + ' [' + body.error.code + ']';
      } catch (err) { /* not JSON */ }
      throw new Error(message);
    }
    return response;
  }

  function cell(row, text, cls) {
    const td = document.createElement('td');
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
  }

  function render(entries) {
    const body = $('entries').querySelector('tbody');
    body.replaceChildren();
    for (const e of entries) {
      const tr = document.createElement('tr');
      tr.dataset.type = e.type;
      cell(tr, new Date(e.time_ms).toISOString().replace('T', ' ').replace('Z', ''), 'when');
      cell(tr, e.type);
      cell(tr, e.session_id);
      cell(tr, e.text);
      cell(tr, e.staff ? e.staff + ' · ' + e.role : '');
      cell(tr, e.ip);
      body.appendChild(tr);
    }
  }

  async function search(at) {
    if (!$('staff-token').value.trim()) {
      setStatus('error', 'Paste a staff token first.');
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, $('staff-token').value.trim());
    if (at === 0) pinnedUntil = null;
    setStatus('loading', 'Searching…');
    try {
      const response = await call('/api/backoffice/log?' + params({ limit: LIMIT, offset: at }));
      const data = await response.json();
      pinnedUntil = data.until_ms;
      offset = data.offset;
      render(data.entries);
      $('prev').disabled = offset === 0;
      $('next').disabled = data.next_offset === null;
      $('page').textContent = data.entries.length
        ? 'Entries ' + (offset + 1) + '–' + (offset + data.entries.length) : 'No entries';
      setStatus(data.entries.length ? 'loaded' : 'empty',
                data.entries.length ? 'Newest first.' : 'Nothing matches these filters.');
    } catch (err) {
      render([]);
      setStatus('error', err.message);
    }
    $('status').dataset.done = String(++finished);
  }

  async function download() {
    setStatus('loading', 'Preparing the CSV…');
    try {
      const response = await call('/api/backoffice/log.csv?' + params({}));
      const blob = await response.blob();
      const a = document.createElement('a');
      a.href = URL.createObjectURL(blob);
      a.download = 'openconsult-log.csv';
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 10000);
      setStatus('loaded', 'CSV downloaded.');
    } catch (err) {
      setStatus('error', err.message);
    }
  }

  function init() {
    const box = $('types');
    for (const t of TYPES) {
      const label = document.createElement('label');
      const input = document.createElement('input');
      input.type = 'checkbox';
      input.id = 'type-' + t;
      input.checked = true;
      label.append(input, t);
      box.appendChild(label);
    }
    $('staff-token').value = sessionStorage.getItem(TOKEN_KEY) || '';
    $('log-form').addEventListener('submit', (ev) => { ev.preventDefault(); search(0); });
    $('prev').addEventListener('click', () => search(Math.max(0, offset - LIMIT)));
    $('next').addEventListener('click', () => search(offset + LIMIT));
    $('download').addEventListener('click', download);
    $('forget-token').addEventListener('click', () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $('staff-token').value = '';
      setStatus('idle', 'Token forgotten.');
    });
  }

  document.addEventListener('DOMContentLoaded', init);
}());
