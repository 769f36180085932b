/*
 * OpenConsult consultation pages (signalling/static/index.html), built on the SDK in openconsult.js.
 *
 * A consultation link `/#token=<JWT>` (or an old `/?token=<JWT>`) switches the page from the demo form to:
 *   - the patient's waiting room (token role `patient` with a `consultation` claim): device check
 *     (camera preview + microphone level; advice only: it waits for the permission prompt, keeps
 *     whatever works — audio only, or nothing — says how to allow the camera, and its result goes
 *     with `waiting_room.enter` to the clinician's queue), a pre-call connection test button
 *     (OpenConsult.runPrecallTest, logged in the consultation's session), "You are early / on time / late", the live place in
 *     line, the clinic's announcements, chat, "Leave waiting room"; on `admitted` the call
 *     (publish camera and microphone, receive the clinician), chat stays; then "The consultation
 *     has ended". On load the page reads the consultation (`consultation.get`), so a reload
 *     mid-call goes straight back to the call and a reload after the end shows the outcome;
 *   - a shared walk-in link `/#walk_in=<JWT>`: the patient gives their name, the page trades the
 *     link for their own token (`POST /api/walk-in`), replaces the address with `/#token=<their
 *     token>` (a reload keeps the place) and goes on as the patient's waiting room above;
 *   - the clinician's desk (a staff token with a `consultation` or `departments` claim, or a
 *     `?waiting_room=` parameter): the live queue of the department's waiting rooms (arrival
 *     badge, the patient's name and reference, waiting time, what their device check found —
 *     "camera denied · voice only" —, Admit), the call with chat, End / Phone
 *     consultation instead / Complete, and the rooms' current announcements and posting new ones;
 *     in the call, "Add a relative or an interpreter" (a guest link to hand over) and Remove;
 *   - a guest's call (token role `guest` with a `consultation` claim: a relative or an interpreter
 *     the clinician added): straight into the consultation's call, nothing else of the workflow;
 *     removed by the clinician, the page says so.
 * Every call view lists who is in the call, lays out up to 6+ people in a grid that reflows on a
 * phone, shares the screen ("Share your screen": a second stream, shown large to the others).
 * Any other page load is left to demo.js.
 *
 * A dropped connection (network change, server restart) is not the end: the SDK rejoins by itself
 * while the status line says "Reconnecting… (attempt N)"; once back, the page runs its load path
 * again for where it is (patient: `consultation.get`, then the waiting room or back to the call;
 * clinician: the waiting rooms' `queue.watch`, and the call if one was going). The SDK publishes
 * the camera again and the page resubscribes to the streams it announces.
 *
 * All user-provided text (names, references, chat, announcements) is set with textContent only.
 *
 * For tests and support staff the page exposes `window.consult`:
 *   consult.active        true when this page is a patient's or clinician's consultation page
 *   consult.view          'patient' | 'clinician' | 'guest' | null
 *   consult.state         'name' (walk-in: asking for the name) | 'connecting' | 'waiting' | 'left' | 'queue' |
 *                         'in_call' | 'wrapup' | 'ended' | 'error'
 *   consult.walkIn        true when the page was opened with a walk-in link
 *   consult.error         {code, message} of the last error, or null; consult.warning likewise
 *   consult.reconnecting  {attempt, code} while a connection is being re-established, else null
 *   consult.reconnects    how many times a connection came back
 *   consult.sessionErrors [{code, message}] of background failures
 *   consult.mediaFailure  {kind, reason, code, streamId, attempt, retrying, text} while a media connection is
 *                         failing (not up within the SDK's deadline, or failed), shown in plain words; else null
 *   consult.arrival, consult.position, consult.announcements, consult.queues, consult.consultation
 *   consult.chat          [ChatMessage] as shown
 *   consult.guests        [{guest_id, name, guest_link, removed}] the clinician added in this call
 *   consult.people        [{connection_id, name, role}] the others in the call, as listed
 *   consult.screenShare   the Publisher of this page's screen share, or null
 *   consult.devices       {camera, microphone} as the device check found them (patient)
 *   consult.precall       {state: 'running'|'done'|'error', result, error} of the connection test (patient)
 *   await consult.inboundVideoStats()  → [{subscriptionId, streamId, framesDecoded, …}]
 */
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const STAFF_ROLES = ['clinician', 'department_admin', 'organisation_admin', 'admin'];
  const ENDED_STATES = ['ended', 'completed', 'journal_done', 'phone', 'cancelled', 'no_show'];
  const ARRIVAL_LABEL = { early: 'Early', on_time: 'On time', late: 'Late', walk_in: 'Walk-in' };

  const consult = {
    active: false,
    view: null,
    state: 'idle',
    error: null,
    warning: null,
    sessionErrors: [],
    mediaFailure: null,
    claims: null,
    sessionId: null,
    session: null, // the joined session (patient: the consultation room; clinician: the desk)
    callSession: null, // the session carrying the call (may be `session`)
    arrival: null,
    appointmentMs: null,
    position: null,
    channelId: null,
    consultation: null,
    announcements: [],
    queues: {}, // room id → {room, queue, receivedAt}
    chat: [],
    localStream: null,
    publisher: null,
    subscriptions: new Map(), // stream id → Subscription (null while being set up)
    walkIn: false,
    reconnecting: null,
    reconnects: 0,
    guests: [],
    people: [],
    screenShare: null,
    inboundVideoStats: inboundVideoStats,
  };
  window.consult = consult;

  // Join links carry the token in the fragment (/#token=…); an old /?token=… is moved there.
  const params = OpenConsult.pageParams();
  // A walk-in replaces these with the patient's own token (see startWalkIn).
  let token = (params.get('token') || '').trim();
  let claims = token ? OpenConsult.decodeToken(token) : null;
  const walkInToken = token ? '' : (params.get('walk_in') || '').trim();
  const view = walkInToken ? 'patient' : chooseView(claims);
  if (!view) {
    return; // The plain demo page: demo.js takes over.
  }
  consult.active = true;
  consult.view = view;
  consult.claims = claims;
  consult.walkIn = Boolean(walkInToken);
  document.body.dataset.view = view;
  $('demo-view').hidden = true;
  $('consult-view').hidden = false;
  $('view-label').textContent = view === 'clinician' ? 'clinician' : 'video consultation';
  document.title = view === 'clinician' ? 'Waiting patients — OpenConsult' : 'Your video consultation — OpenConsult';

  $('copy-session').addEventListener('click', () => {
    if (consult.sessionId && navigator.clipboard) {
      navigator.clipboard.writeText(consult.sessionId).catch(() => {});
    }
  });

  function chooseView(c) {
    if (!c || typeof c !== 'object') {
      return null;
    }
    if (c.role === 'patient' && typeof c.consultation === 'string' && c.consultation) {
      return 'patient';
    }
    if (c.role === 'guest' && typeof c.consultation === 'string' && c.consultation) {
      return 'guest';
    }
    const departments = Array.isArray(c.departments) ? c.departments : [];
    if (
      STAFF_ROLES.indexOf(c.role) !== -1 &&
      (typeof c.consultation === 'string' || departments.length > 0 || params.has('waiting_room'))
    ) {
      return 'clinician';
    }
    return null;
  }

  // ---- formatting --------------------------------------------------------------------------

  function clock(ms) {
    return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  function dayAndClock(ms) {
    const when = new Date(ms);
    const today = new Date();
    if (when.toDateString() === today.toDateString()) {
      return clock(ms);
    }
    return when.toLocaleDateString([], { weekday: 'short', day: 'numeric', month: 'short' }) + ' ' + clock(ms);
  }

  function duration(ms) {
    const total = Math.max(0, Math.floor(ms / 1000));
    const minutes = Math.floor(total / 60);
    const seconds = total % 60;
    return String(minutes).padStart(2, '0') + ':' + String(seconds).padStart(2, '0');
  }

  function waited(ms) {
    const minutes = Math.floor(Math.max(0, ms) / 60000);
    if (minutes < 1) {
      return 'under a minute';
    }
    if (minutes < 60) {
      return minutes + ' min';
    }
    return Math.floor(minutes / 60) + ' h ' + (minutes % 60) + ' min';
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    return node;
  }

  // ---- status line -------------------------------------------------------------------------

  const statusLine = $('consult-status');

  function setStatus(state, text) {
    consult.state = state;
    if (consult.reconnecting) {
      // Where the page is (the view) stays; the line says the connection is coming back.
      statusLine.dataset.state = 'reconnecting';
      statusLine.textContent =
        'Connection lost. Reconnecting… (attempt ' + consult.reconnecting.attempt + ')';
    } else {
      statusLine.dataset.state = state;
      statusLine.textContent = text;
    }
    if (consult.warning) {
      statusLine.appendChild(el('span', 'warning', ' Warning: ' + consult.warning.message + ' [' + consult.warning.code + ']'));
    }
  }

  function describe(err) {
    return {
      code: (err && err.code) || (err && err.name) || 'error',
      message: (err && err.message) || String(err),
    };
  }

  function showError(err, context) {
    const error = describe(err);
    consult.error = error;
    statusLine.dataset.code = error.code;
    consult.warning = null;
    setStatus('error', (context ? context + ': ' : 'Error: ') + error.message + ' [' + error.code + ']');
    console.error('OpenConsult consultation:', error.code, error.message);
  }

  let statusText = '';
  function say(state, text) {
    statusText = text;
    setStatus(state, text);
  }

  function warn(err, context) {
    const error = describe(err);
    consult.warning = { code: error.code, message: context + ': ' + error.message };
    statusLine.dataset.code = error.code;
    console.warn('OpenConsult consultation:', error.code, context, error.message);
    setStatus(consult.state, statusText);
  }

  function clearWarning() {
    consult.warning = null;
    delete statusLine.dataset.code;
    setStatus(consult.state, statusText);
  }

  function wireErrors(session) {
    session.on('error', (err) => {
      consult.sessionErrors.push({ code: err.code, message: err.message });
      console.warn('OpenConsult session error', err.code, err.message);
    });
    wireMediaFailures(session);
  }

  /** A media connection not up in time (or failed): say so, and what to try; the SDK retries it. */
  function wireMediaFailures(session) {
    session.on('mediaFailed', (event) => {
      const text = OpenConsult.mediaFailureText(event);
      consult.mediaFailure = {
        kind: event.kind, reason: event.reason, code: event.error.code, streamId: event.streamId,
        attempt: event.attempt, retrying: event.retrying, text: text,
      };
      warn({ code: event.error.code, message: text }, 'Media not connected');
    });
    session.on('mediaConnected', ({ peerId }) => {
      const failure = consult.mediaFailure;
      const subscription = session.subscriptions.get(peerId);
      if (failure && (failure.kind === 'publish' ? session.publishers.has(peerId)
        : Boolean(subscription && subscription.streamId === failure.streamId))) {
        consult.mediaFailure = null;
        clearWarning();
      }
    });
  }

  // ---- reconnecting ------------------------------------------------------------------------

  const reconnectingSessions = new Set();

  /**
   * Show a session's reconnect attempts on the status line, and call `resume` once it is back.
   * Wired before the page's own `disconnected` handler so that one shows its error on a clean line.
   */
  function wireReconnect(session, resume) {
    const settle = () => {
      reconnectingSessions.delete(session);
      if (reconnectingSessions.size === 0) {
        consult.reconnecting = null;
      }
      setStatus(consult.state, statusText);
    };
    session.on('reconnecting', ({ attempt, code }) => {
      reconnectingSessions.add(session);
      consult.reconnecting = { attempt: attempt, code: code };
      setStatus(consult.state, statusText);
    });
    session.on('reconnected', () => {
      consult.reconnects += 1;
      settle();
      resume();
    });
    session.on('disconnected', settle);
  }

  /** Fetch the open chat's history again (messages sent while the connection was down). */
  function refreshChat() {
    if (consult.channelId && consult.session && consult.session.state === 'connected') {
      openChat(consult.channelId, $('chat-help').textContent);
    }
  }

  /** Run a user action; a failure shows its code on the status line and re-enables the button. */
  async function action(button, context, run) {
    if (button) {
      button.disabled = true;
    }
    try {
      clearWarning();
      return await run();
    } catch (err) {
      warn(err, context);
      return undefined;
    } finally {
      if (button) {
        button.disabled = false;
      }
    }
  }

  // ---- announcements -----------------------------------------------------------------------

  const announcementList = $('announcement-list');

  function addAnnouncement(announcement) {
    if (!announcement || !announcement.announcement_id) {
      return;
    }
    consult.announcements = consult.announcements.filter((a) => a.announcement_id !== announcement.announcement_id);
    consult.announcements.push(announcement);
    renderAnnouncements();
  }

  function renderAnnouncements() {
    const now = Date.now();
    consult.announcements = consult.announcements.filter(
      (a) => (a.state === undefined || a.state === 'active') && (!a.expires_ms || a.expires_ms > now),
    );
    announcementList.replaceChildren();
    for (const a of consult.announcements) {
      const item = el('li', 'announcement');
      item.dataset.announcementId = a.announcement_id;
      item.appendChild(el('span', 'announcement-text', a.text));
      const meta = [];
      if (consult.view === 'clinician' && consult.queues[a.room_id]) {
        meta.push(consult.queues[a.room_id].room.name || a.room_id);
      }
      if (a.posted_ms) {
        meta.push('posted ' + clock(a.posted_ms));
      }
      if (consult.view === 'clinician' && a.expires_ms) {
        meta.push('until ' + clock(a.expires_ms));
      }
      if (meta.length) {
        item.appendChild(el('span', 'announcement-meta', meta.join(' · ')));
      }
      announcementList.appendChild(item);
    }
    const panel = $('announcements-panel');
    panel.hidden = consult.announcements.length === 0 || (consult.view === 'patient' && consult.state === 'ended');
  }

  // ---- chat --------------------------------------------------------------------------------

  const chatLog = $('chat-log');

  function openChat(channelId, help) {
    if (consult.channelId !== channelId) {
      consult.channelId = channelId;
      consult.chat = [];
      chatLog.replaceChildren();
    }
    $('chat-help').textContent = help;
    $('chat').hidden = false;
    const session = consult.session;
    session
      .chatHistory(channelId)
      .then((data) => {
        if (consult.channelId === channelId) {
          for (const message of data.messages || []) {
            addChat(message);
          }
        }
      })
      .catch((err) => warn(err, 'Cannot load the chat'));
  }

  function senderLabel(message) {
    const mine =
      (consult.view === 'patient' && message.sender_role === 'patient') ||
      (consult.view === 'clinician' && message.sender === consult.claims.sub && message.sender_role !== 'patient');
    if (mine) {
      return 'You';
    }
    if (message.sender_role === 'patient') {
      return consult.view === 'clinician' ? 'Patient ' + message.sender : 'Patient';
    }
    if (consult.view === 'patient') {
      return message.sender_role === 'clinician' ? 'Clinician' : 'Clinic';
    }
    return (message.sender_role || 'staff') + ' ' + message.sender;
  }

  function addChat(message) {
    if (!message || message.channel_id !== consult.channelId) {
      return;
    }
    if (consult.chat.some((m) => m.message_id === message.message_id)) {
      return; // The desk and the call connection both receive it; the response repeats it.
    }
    consult.chat.push(message);
    consult.chat.sort((a, b) => a.time_ms - b.time_ms);
    const item = el('li', 'chat-message');
    item.dataset.messageId = message.message_id;
    const label = senderLabel(message);
    item.dataset.mine = label === 'You' ? 'true' : 'false';
    const head = el('p', 'chat-meta');
    head.appendChild(el('span', 'chat-sender', label));
    head.appendChild(el('time', 'chat-time', clock(message.time_ms)));
    item.appendChild(head);
    // Verbatim: HTML or script in a message is text, never markup.
    item.appendChild(el('p', 'chat-text', message.text));
    const index = consult.chat.indexOf(message);
    const before = chatLog.children[index];
    chatLog.insertBefore(item, before || null);
    chatLog.scrollTop = chatLog.scrollHeight;
  }

  $('chat-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = $('chat-text');
    const text = input.value;
    if (!text.trim() || !consult.channelId || !consult.session) {
      return;
    }
    action($('chat-send'), 'Cannot send the message', async () => {
      const data = await consult.session.sendChat(consult.channelId, text);
      input.value = '';
      addChat(data.message);
    });
  });

  // ---- media -------------------------------------------------------------------------------

  const stage = $('stage');

  async function getCamera() {
    return navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 640, height: 480 } });
  }

  function tileId(streamId) {
    return window.OpenConsultTiles.tileId('call-tile-', streamId);
  }

  function streamLabel(session, stream) {
    const connection = session.connections.get(stream.connection_id);
    const screen = stream.video_source === 'screen' ? ' — screen' : '';
    if (connection && connection.role === 'guest') {
      return connection.name + ' (guest)' + screen;
    }
    if (consult.view === 'guest') {
      return ((connection && connection.name) || stream.name || 'Participant')
        + (connection && connection.role === 'clinician' ? ' (clinician)' : '') + screen;
    }
    if (consult.view === 'patient') {
      return ((connection && connection.name) || 'Your clinician') + screen;
    }
    const c = consult.consultation;
    const ref = c && c.patient_ref;
    const name = (c && c.patient_name) || (connection && connection.name) || stream.name || 'Patient';
    return (ref ? name + ' (' + ref + ')' : name) + screen;
  }

  function addRemoteTile(session, stream, subscription) {
    removeRemoteTile(stream.stream_id);
    const tile = window.OpenConsultTiles.create({
      id: tileId(stream.stream_id), streamId: stream.stream_id, label: streamLabel(session, stream),
      mediaStream: subscription.mediaStream, soundText: 'Turn on sound',
    });
    // A screen share takes the big tile (first, full width); cameras share the grid.
    tile.figure.classList.toggle('screen', stream.video_source === 'screen');
    stage.insertBefore(tile.figure, $('call-local-tile'));
    $('stage-empty').hidden = true;
    layoutStage();
    tile.start();
  }

  function removeRemoteTile(streamId) {
    window.OpenConsultTiles.remove(tileId(streamId));
    $('stage-empty').hidden = stage.querySelector('.tile.remote') !== null;
    layoutStage();
  }

  /** One remote camera: full stage with the own preview in a corner; more, or a screen: a grid. */
  function layoutStage() {
    const remotes = stage.querySelectorAll('.tile.remote').length;
    const screen = stage.querySelector('.tile.remote.screen') !== null;
    stage.classList.toggle('group', remotes > 1 || screen);
    stage.classList.toggle('has-screen', screen);
    stage.dataset.tiles = String(remotes);
  }

  async function subscribeTo(session, stream) {
    if (consult.callSession !== session || consult.state !== 'in_call' || consult.subscriptions.has(stream.stream_id)) {
      return;
    }
    consult.subscriptions.set(stream.stream_id, null);
    try {
      const subscription = await session.subscribe(stream.stream_id);
      if (consult.callSession !== session || consult.state !== 'in_call' || !session.streams.has(stream.stream_id)) {
        subscription.unsubscribe().catch(() => {});
        consult.subscriptions.delete(stream.stream_id);
        return;
      }
      consult.subscriptions.set(stream.stream_id, subscription);
      subscription.on('ended', () => {
        if (consult.subscriptions.get(stream.stream_id) === subscription) {
          consult.subscriptions.delete(stream.stream_id);
          removeRemoteTile(stream.stream_id);
        }
      });
      addRemoteTile(session, stream, subscription);
    } catch (err) {
      consult.subscriptions.delete(stream.stream_id);
      if (consult.callSession === session && session.state === 'connected') {
        warn(err, 'Cannot receive the video');
      }
    }
  }

  function wireMedia(session) {
    wirePeople(session);
    session.on('streamCreated', ({ stream }) => subscribeTo(session, stream));
    session.on('streamDestroyed', ({ stream }) => {
      if (consult.callSession !== session) {
        return;
      }
      const subscription = consult.subscriptions.get(stream.stream_id);
      consult.subscriptions.delete(stream.stream_id);
      if (subscription) {
        subscription.unsubscribe().catch(() => {});
      }
      removeRemoteTile(stream.stream_id);
    });
  }

  let callTimer = null;
  let callStartedMs = 0;

  /** Show the call, publish `localStream` (or ask for the camera) and receive every remote stream. */
  async function startCall(session) {
    consult.callSession = session;
    $('call').hidden = false;
    $('share-screen').hidden = false;
    renderPeople();
    callStartedMs = Date.now();
    $('call-timer').textContent = '00:00';
    clearInterval(callTimer);
    callTimer = setInterval(() => {
      $('call-timer').textContent = duration(Date.now() - callStartedMs);
    }, 1000);
    for (const stream of session.streams.values()) {
      subscribeTo(session, stream);
    }
    if (!consult.localStream) {
      try {
        consult.localStream = await getCamera();
      } catch (err) {
        warn({ code: 'media_unavailable', message: (err.name || 'Error') + ': ' + err.message }, 'No camera or microphone, receiving only');
      }
    }
    if (consult.callSession !== session || consult.state !== 'in_call') {
      return;
    }
    if (consult.localStream) {
      const local = $('call-local-video');
      local.srcObject = consult.localStream;
      $('call-local-tile').hidden = false;
      local.play().catch(() => {});
      await publishCamera(session);
    }
  }

  /** Send the camera in the call; the SDK publishes it again by itself after a reconnect. */
  async function publishCamera(session) {
    try {
      const publisher = await session.publish(consult.localStream, { name: session.name, videoSource: 'camera' });
      consult.publisher = publisher;
      publisher.on('ended', ({ error }) => {
        if (consult.publisher === publisher) {
          consult.publisher = null;
          warn(error, 'Cannot send your video');
        }
      });
    } catch (err) {
      if (consult.callSession === session) {
        warn(err, 'Cannot send your video');
      }
    }
  }

  /** Back in the call after a reconnect: send the camera if it was not being sent (the drop came first). */
  function resumeCall(session) {
    if (consult.callSession !== session || consult.state !== 'in_call') {
      return;
    }
    if (consult.localStream && (!consult.publisher || consult.publisher.closed)) {
      publishCamera(session);
    }
  }

  /** Stop sending and receiving; the session itself is left to the caller. */
  function stopCall() {
    clearInterval(callTimer);
    callTimer = null;
    const session = consult.callSession;
    stopScreenShare(session);
    if (consult.publisher) {
      consult.publisher.unpublish().catch(() => {});
      consult.publisher = null;
    }
    for (const subscription of consult.subscriptions.values()) {
      if (subscription) {
        subscription.unsubscribe().catch(() => {});
      }
    }
    consult.subscriptions.clear();
    for (const figure of Array.from(stage.querySelectorAll('.tile.remote'))) {
      removeRemoteTile(figure.dataset.streamId);
    }
    $('call-local-video').srcObject = null;
    $('call-local-tile').hidden = true;
    $('call').hidden = true;
    consult.callSession = null;
    consult.guests = [];
    renderGuests();
    renderPeople();
    return session;
  }

  function stopLocalMedia() {
    if (consult.localStream) {
      for (const track of consult.localStream.getTracks()) {
        track.stop();
      }
    }
    consult.localStream = null;
    stopMeter();
    $('preview-video').srcObject = null;
  }

  function inboundVideoStats() {
    return OpenConsult.inboundVideoStats(consult.subscriptions);
  }

  // ---- device check (patient) --------------------------------------------------------------

  let meter = null; // {context, analyser, timer}

  function markCheck(id, ok, text) {
    const node = $(id);
    node.dataset.ok = ok ? 'true' : 'false';
    node.textContent = text;
  }

  const DEVICE_TEXT = {
    ok: 'working',
    denied: 'not allowed',
    not_found: 'not found',
    in_use: 'in use by another program',
    error: 'not working',
  };

  /** How to allow the camera and microphone again, in this browser's own words. */
  function allowHelp() {
    const ua = navigator.userAgent || '';
    if (/Firefox\//.test(ua)) {
      return 'In Firefox: click the camera icon at the left of the address bar, remove the block for the camera and microphone, then press "Check again".';
    }
    if (/Safari\//.test(ua) && !/Chrome\/|Chromium\//.test(ua)) {
      return 'In Safari: open Safari > Settings for this website, set Camera and Microphone to Allow, then press "Check again".';
    }
    return 'Click the camera icon (or the padlock) at the right or left of the address bar, choose "Allow" for the camera and microphone, then press "Check again".';
  }

  /** Advice under the device check: what works, what the clinic will see, and how to fix it. */
  function showDeviceAdvice(result) {
    let node = $('device-advice');
    if (!node) {
      node = el('div', 'device-advice');
      node.id = 'device-advice';
      node.setAttribute('role', 'status');
      $('device-check').querySelector('.device-status').appendChild(node);
    }
    node.replaceChildren();
    const { camera, microphone } = result;
    node.dataset.camera = camera;
    node.dataset.microphone = microphone;
    if (camera === 'ok' && microphone === 'ok') {
      return;
    }
    const can = microphone === 'ok' ? 'You can still join: the consultation will be by voice only.'
      : 'You can still join: the clinic can see you are waiting and can phone you instead.';
    node.appendChild(el('p', null, can));
    if (camera === 'denied' || microphone === 'denied') {
      node.appendChild(el('p', 'allow-help', allowHelp()));
    } else if (camera === 'in_use' || microphone === 'in_use') {
      node.appendChild(el('p', null, 'Close other programs that may use the camera (another video call), then press "Check again".'));
    } else if (camera === 'not_found' || microphone === 'not_found') {
      node.appendChild(el('p', null, 'Connect a camera or headset, then press "Check again".'));
    }
    const again = el('button', null, 'Check again');
    again.type = 'button';
    again.id = 'device-again';
    again.addEventListener('click', () => {
      again.disabled = true;
      stopLocalMedia();
      deviceChecked = deviceCheck(consult.session).then(async (found) => {
        if (consult.session && consult.state === 'waiting') {
          // Still in line: the clinic's queue shows the new result.
          await consult.session.enterWaitingRoom({ devices: found }).catch(() => {});
        }
        return found;
      });
    });
    node.appendChild(again);
  }

  /**
   * Camera preview and microphone level. Advice only: waits as long as the person takes to answer
   * the browser's permission prompt, then resolves `{camera, microphone}` (each 'ok', 'denied',
   * 'not_found', 'in_use' or 'error'); whatever works is kept for the call. The result, with the
   * browser's error name, goes to the session's event log (`deviceCheck`).
   */
  async function deviceCheck(session) {
    $('device-check').hidden = false;
    markCheck('camera-check', false, 'Camera: please answer your browser\'s question — choose "Allow"');
    markCheck('mic-check', false, 'Microphone: waiting for your answer…');
    const result = await OpenConsult.checkDevices();
    consult.devices = { camera: result.camera, microphone: result.microphone };
    if (result.stream) {
      consult.localStream = result.stream;
      const preview = $('preview-video');
      preview.srcObject = result.stream;
      preview.play().catch(() => {});
    }
    markCheck('camera-check', result.camera === 'ok', 'Camera: ' + (DEVICE_TEXT[result.camera] || result.camera));
    markCheck('mic-check', result.microphone === 'ok', 'Microphone: ' + (DEVICE_TEXT[result.microphone] || result.microphone));
    if (result.stream && result.stream.getAudioTracks().length) {
      startMeter(result.stream);
    }
    if (result.error) {
      consult.deviceError = describe(result.error);
    }
    session.reportDeviceCheck(result.camera, result.microphone, result.error, result.error ? { audio: true, video: true } : undefined);
    showDeviceAdvice(result);
    addPrecallButton();
    return consult.devices;
  }

  /**
   * The pre-call network test inside the patient's flow (a button in the device check): through
   * the SFU in a private room, the result shown here and logged as a `precallTest` client event
   * in the patient's own consultation session. `consult.precall` = {state, result, error}.
   */
  function addPrecallButton() {
    if ($('precall-run')) {
      return;
    }
    const box = el('div', 'precall-box');
    box.id = 'precall-box';
    const button = el('button', null, 'Test my connection (10 s)');
    button.type = 'button';
    button.id = 'precall-run';
    const status = el('p', 'muted small', '');
    status.id = 'precall-status';
    status.setAttribute('role', 'status');
    const verdict = el('p', 'precall-verdict', '');
    verdict.id = 'precall-verdict';
    const advice = el('p', 'small', '');
    advice.id = 'precall-advice';
    const figures = el('p', 'muted small', '');
    figures.id = 'precall-figures';
    const more = el('a', 'small', 'More tests (speakers) on the test page');
    more.href = '/test';
    more.target = '_blank';
    more.rel = 'noopener';
    box.append(button, status, verdict, advice, figures, more);
    $('device-check').querySelector('.device-status').appendChild(box);
    button.addEventListener('click', async () => {
      button.disabled = true;
      consult.precall = { state: 'running', result: null, error: null };
      verdict.textContent = '';
      advice.textContent = '';
      figures.textContent = '';
      try {
        const live = consult.localStream && consult.localStream.getTracks().some((t) => t.readyState === 'live');
        const result = await OpenConsult.runPrecallTest({
          stream: live ? consult.localStream : undefined,
          reportTo: consult.session,
          onProgress: (p) => {
            status.textContent = p.phase === 'measuring'
              ? 'Measuring your connection… ' + Math.round((p.elapsedMs || 0) / 1000) + ' s'
              : 'Connecting to the video server…';
          },
        });
        consult.precall = { state: 'done', result: result, error: null };
        status.textContent = '';
        verdict.dataset.verdict = result.verdict;
        verdict.textContent = 'Connection: ' + result.title;
        advice.textContent = result.advice;
        figures.textContent = OpenConsult.precallRows(result).map((row) => row[0] + ': ' + row[1]).join(' · ');
      } catch (err) {
        consult.precall = { state: 'error', result: null, error: describe(err) };
        status.textContent = err.code === 'rate_limited'
          ? 'Many tests were run from your network just now. Please try again in a minute.'
          : 'The connection test could not run: ' + (err.message || err);
      } finally {
        button.disabled = false;
      }
    });
  }

  function startMeter(stream) {
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) {
      return;
    }
    const context = new Context();
    const analyser = context.createAnalyser();
    analyser.fftSize = 512;
    context.createMediaStreamSource(stream).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    const meterNode = $('mic-meter');
    let heard = false;
    const timer = setInterval(() => {
      analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const sample of samples) {
        sum += sample * sample;
      }
      // Loudness on a 60 dB scale: quiet speech moves the bar, a shout fills it.
      const rms = Math.sqrt(sum / samples.length);
      const level = rms > 0 ? Math.max(0, Math.min(1, (20 * Math.log10(rms) + 60) / 60)) : 0;
      meterNode.value = level;
      consult.micLevel = Math.max(consult.micLevel || 0, level);
      if (level > 0.25 && !heard) {
        heard = true;
        markCheck('mic-check', true, 'Microphone: working, we can hear you');
      }
    }, 100);
    meter = { context: context, timer: timer };
    // Browsers start audio only after a user gesture: offer a button until it runs.
    if (context.state !== 'running') {
      const button = $('mic-test');
      button.hidden = false;
      const resume = () => context.resume().then(() => {
        button.hidden = context.state === 'running';
      }, () => {});
      button.addEventListener('click', resume);
      document.addEventListener('click', resume, { once: true });
      context.resume().then(() => {
        button.hidden = context.state === 'running';
      }, () => {});
    }
  }

  function stopMeter() {
    if (meter) {
      clearInterval(meter.timer);
      meter.context.close().catch(() => {});
      meter = null;
    }
  }

  /** The id support staff ask for, in the header (the demo page's place for it). */
  function showSessionId(sessionId) {
    $('session-id').textContent = sessionId || '';
    $('session-line').hidden = !sessionId;
  }

  // ---- patient -----------------------------------------------------------------------------

  function arrivalText(arrival) {
    const at = consult.appointmentMs ? ' for your appointment at ' + dayAndClock(consult.appointmentMs) : '';
    switch (arrival) {
      case 'early':
        return 'You are early' + at + '. That is fine — please wait here.';
      case 'on_time':
        return 'You are on time' + at + '.';
      case 'late':
        return 'You are late' + at + '. Please wait; the clinic can see that you are here.';
      case 'walk_in':
        return 'You came without an appointment. Please wait; you will be seen as soon as possible.';
      default:
        return '';
    }
  }

  function showArrival() {
    const node = $('arrival');
    node.dataset.arrival = consult.arrival || '';
    node.textContent = arrivalText(consult.arrival);
  }

  function showPosition(position) {
    consult.position = position;
    const node = $('position');
    if (position === 1) {
      node.textContent = 'You are number 1 in line — you are next.';
    } else if (typeof position === 'number') {
      node.textContent = 'You are number ' + position + ' in line.';
    } else {
      node.textContent = '';
    }
  }

  function patientWaiting(entered) {
    consult.arrival = entered.arrival;
    consult.sessionId = entered.session_id;
    if (entered.appointment_ms) {
      consult.appointmentMs = entered.appointment_ms;
    }
    showArrival();
    showPosition(entered.position);
    consult.announcements = []; // the response has all current ones (a reconnect may have missed a withdrawal)
    for (const a of entered.announcements || []) {
      addAnnouncement(a);
    }
    $('waiting').hidden = false;
    $('leave-waiting-room').hidden = false;
    $('reenter-waiting-room').hidden = true;
    $('waiting-title').textContent = 'You are in the waiting room';
    openChat(entered.channel_id, 'Write to the clinic before and during your consultation.');
    say('waiting', 'Connected. You are in the waiting room.');
  }

  function patientAdmitted() {
    if (consult.state === 'in_call' || consult.state === 'ended') {
      return;
    }
    consult.state = 'in_call';
    stopMeter();
    $('waiting').hidden = true;
    $('device-check').hidden = true;
    $('announcements-panel').hidden = true;
    $('patient-call-actions').hidden = false;
    $('call-title').textContent = 'Your video consultation';
    say('in_call', 'The clinician has let you in. Your consultation has started.');
    startCall(consult.session);
  }

  const PATIENT_OUTCOME = {
    ended: ['The consultation has ended', 'Thank you. You can close this page.'],
    completed: ['The consultation has ended', 'Thank you. You can close this page.'],
    journal_done: ['The consultation has ended', 'Thank you. You can close this page.'],
    phone: ['Your clinician will phone you instead', 'The consultation continues by phone. Please keep your phone nearby.'],
    cancelled: ['The consultation was cancelled', 'Please contact your clinic if you need a new appointment.'],
    no_show: ['The appointment was closed', 'Please contact your clinic if you still need to be seen.'],
  };

  function patientFinished(state) {
    if (consult.state === 'ended') {
      return;
    }
    stopCall();
    stopLocalMedia();
    consult.state = 'ended';
    const [title, detail] = PATIENT_OUTCOME[state] || PATIENT_OUTCOME.ended;
    $('finished-title').textContent = title;
    $('finished-detail').textContent = detail;
    $('finished').hidden = false;
    for (const id of ['waiting', 'device-check', 'call', 'announcements-panel']) {
      $(id).hidden = true;
    }
    $('chat-help').textContent = 'The chat stays here after the consultation.';
    say('ended', title + '.');
  }

  function onPatientConsultation(c) {
    consult.consultation = c;
    if (c.appointment_ms && consult.appointmentMs !== c.appointment_ms) {
      consult.appointmentMs = c.appointment_ms;
      showArrival();
    }
    if (c.state === 'in_progress') {
      patientAdmitted();
    } else if (ENDED_STATES.indexOf(c.state) !== -1) {
      patientFinished(c.state);
    }
  }

  function joinErrorText(err, c) {
    if (err.code === 'token_not_yet_valid' && c && c.nbf) {
      return 'Your link is not open yet. It opens at ' + dayAndClock(c.nbf * 1000) + '. Please come back then';
    }
    if (err.code === 'token_expired') {
      return 'This link has expired. Please contact your clinic';
    }
    if (err.code === 'unauthorized') {
      return 'This link is not valid. Please check that you opened the whole link';
    }
    return 'Cannot connect to your clinic';
  }

  async function startPatient() {
    say('connecting', 'Connecting to your clinic…');
    let session;
    try {
      session = await OpenConsult.connect({ token: token });
    } catch (err) {
      showError(err, joinErrorText(err, claims));
      return;
    }
    consult.session = session;
    consult.sessionId = session.sessionId;
    showSessionId(session.sessionId);
    wireErrors(session);
    wireMedia(session);
    session.on('consultationChanged', ({ consultation }) => consultation && onPatientConsultation(consultation));
    session.on('positionChanged', ({ position }) => showPosition(position));
    session.on('announcement', ({ announcement }) => addAnnouncement(announcement));
    session.on('admitted', () => patientAdmitted());
    session.on('removedFromQueue', () => {
      showPosition(null);
      consult.state = 'left';
      $('waiting-title').textContent = 'The clinic took you out of the waiting room';
      $('arrival').textContent = 'Please contact the clinic if you still need this consultation.';
      $('leave-waiting-room').hidden = true;
      $('reenter-waiting-room').hidden = false;
      say('left', 'The clinic took you out of the waiting room.');
    });
    session.on('chatMessage', ({ message }) => addChat(message));
    wireReconnect(session, () => resumePatient(session));
    session.on('disconnected', ({ code, reason, left }) => {
      if (left || consult.state === 'ended') {
        return;
      }
      stopCall();
      showError({ code: 'connection_closed', message: 'The connection to the clinic was lost (close code ' + code + (reason ? ', ' + reason : '') + '). Open your link again to get back your place' }, 'Disconnected');
    });
    await loadPatient(session);
  }

  /** Back after a reconnect: where the page was decides what to read again. */
  async function resumePatient(session) {
    if (consult.session !== session || consult.state === 'ended') {
      return;
    }
    if (consult.state === 'left') {
      // Out of line by choice (or by the clinic): stay out, but notice a cancelled consultation.
      await readPatientConsultation(session);
      return;
    }
    const wasInCall = consult.state === 'in_call';
    await loadPatient(session);
    if (wasInCall && consult.state === 'in_call') {
      resumeCall(session); // the SDK resubscribes the clinician's stream
      refreshChat();
    }
  }

  let deviceChecked = null; // the device check's promise: it runs once per page

  /**
   * The patient page's load path, also run after a reconnect. Where is the consultation? A reload
   * (or a reconnect) mid-call goes straight back to the call, after the end shows the outcome;
   * otherwise the device check (once), then the waiting room (entering again keeps the place).
   */
  async function loadPatient(session) {
    if (await readPatientConsultation(session)) {
      return;
    }
    if (!deviceChecked) {
      say('connecting', 'Checking your camera and microphone…');
      deviceChecked = deviceCheck(session);
    }
    const devices = await deviceChecked;
    if (session.state !== 'connected' || consult.state === 'in_call' || consult.state === 'ended') {
      return;
    }
    try {
      patientWaiting(await session.enterWaitingRoom({ devices: devices }));
    } catch (err) {
      // Not waiting any more: let in (or ended) while the device check ran?
      if (err.code === 'invalid_state' && (await readPatientConsultation(session))) {
        return;
      }
      showError(err, 'Cannot enter the waiting room');
    }
  }

  /** Read the consultation (`consultation.get`) and follow it; true if the page is now in the call or ended. */
  async function readPatientConsultation(session) {
    try {
      const data = await session.getConsultation();
      if (data && data.consultation) {
        onPatientConsultation(data.consultation);
      }
    } catch (err) {
      warn(err, 'Cannot read your consultation');
    }
    return consult.state === 'in_call' || consult.state === 'ended';
  }

  // ---- walk-in (patient with a shared link) -------------------------------------------------

  const WALK_IN_ERRORS = {
    token_expired: 'This walk-in link has expired. Please contact your clinic',
    token_not_yet_valid: 'This walk-in link is not open yet. Please try again later',
    unauthorized: 'This walk-in link is not valid. Please check that you opened the whole link',
    forbidden: 'This link is not a walk-in link. Please check that you opened the whole link',
    not_found: 'This waiting room is closed. Please contact your clinic',
  };

  /** Ask for the patient's name, walk in with the link, then continue as with a patient link. */
  function startWalkIn() {
    const section = el('section', 'panel walk-in');
    section.id = 'walk-in';
    section.setAttribute('aria-labelledby', 'walk-in-title');
    const title = el('h2', null, 'Welcome to the waiting room');
    title.id = 'walk-in-title';
    section.appendChild(title);
    section.appendChild(el('p', null, 'Please tell us your name so the clinic knows who is waiting. You do not need an appointment.'));
    const form = el('form', 'walk-in-form');
    form.id = 'walk-in-form';
    const label = el('label', 'grow', 'Your name');
    label.htmlFor = 'walk-in-name';
    const input = document.createElement('input');
    input.id = 'walk-in-name';
    input.name = 'name';
    input.required = true;
    input.maxLength = 80;
    input.autocomplete = 'name';
    label.appendChild(input);
    form.appendChild(label);
    const actions = el('div', 'actions');
    const submit = el('button', 'primary', 'Enter the waiting room');
    submit.type = 'submit';
    submit.id = 'walk-in-submit';
    actions.appendChild(submit);
    form.appendChild(actions);
    section.appendChild(form);
    const main = document.querySelector('.consult-main');
    main.insertBefore(section, main.firstChild);
    input.focus();
    say('name', 'Please enter your name to join the waiting room.');

    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      const name = input.value.trim();
      if (!name || submit.disabled) {
        return;
      }
      submit.disabled = true;
      input.disabled = true;
      clearWarning();
      say('connecting', 'Joining the waiting room…');
      let walked;
      try {
        walked = await OpenConsult.walkIn({ token: walkInToken, name: name });
      } catch (err) {
        submit.disabled = false;
        input.disabled = false;
        if (WALK_IN_ERRORS[err.code]) {
          section.remove();
          showError(err, WALK_IN_ERRORS[err.code]);
          return;
        }
        say('name', 'Please enter your name to join the waiting room.');
        if (err.code === 'rate_limited') {
          const wait = err.retryAfterS ? ' in ' + err.retryAfterS + ' seconds' : ' in a minute';
          warn({ code: err.code, message: 'Many people are using this link right now. Please try again' + wait }, 'Cannot join yet');
        } else {
          warn(err, 'Cannot join the waiting room');
        }
        return;
      }
      // From here on the page is the patient's own link: a reload keeps the place in line.
      token = walked.patient_token;
      claims = OpenConsult.decodeToken(token);
      consult.claims = claims;
      history.replaceState(null, '', location.pathname + '#token=' + encodeURIComponent(token));
      section.remove();
      startPatient();
    });
  }

  $('leave-waiting-room').addEventListener('click', () => {
    action($('leave-waiting-room'), 'Cannot leave the waiting room', async () => {
      await consult.session.leaveWaitingRoom();
      showPosition(null);
      consult.state = 'left';
      $('waiting-title').textContent = 'You left the waiting room';
      $('arrival').textContent = 'The clinic can see that you left. You can come back while your link is valid.';
      $('leave-waiting-room').hidden = true;
      $('reenter-waiting-room').hidden = false;
      say('left', 'You left the waiting room.');
    });
  });

  $('reenter-waiting-room').addEventListener('click', () => {
    action($('reenter-waiting-room'), 'Cannot enter the waiting room', async () => {
      patientWaiting(await consult.session.enterWaitingRoom({ devices: consult.devices || undefined }));
    });
  });

  $('patient-hangup').addEventListener('click', async () => {
    const session = consult.session;
    stopCall();
    stopLocalMedia();
    consult.state = 'ended';
    $('finished-title').textContent = 'You left the consultation';
    $('finished-detail').textContent = 'Open your link again to rejoin while the consultation is still going on.';
    $('finished').hidden = false;
    $('chat').hidden = true;
    say('ended', 'You left the consultation.');
    if (session) {
      await session.leave();
    }
  });

  // ---- clinician ---------------------------------------------------------------------------

  const queuesNode = $('queues');
  let desk = null;

  async function apiGet(path) {
    let response;
    try {
      response = await fetch(path, { headers: { Authorization: 'Bearer ' + token } });
    } catch (err) {
      throw new OpenConsult.OpenConsultError('connection_failed', 'Cannot reach the server');
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const error = (body && (body.error || body)) || {};
      throw new OpenConsult.OpenConsultError(error.code || 'http_' + response.status, error.message || 'HTTP ' + response.status);
    }
    return body;
  }

  /** The waiting rooms to watch: `?waiting_room=` (repeatable), a `waiting_room` claim, or the departments' rooms. */
  async function findRooms() {
    const wanted = params.getAll('waiting_room').filter(Boolean);
    if (!wanted.length && typeof claims.waiting_room === 'string') {
      wanted.push(claims.waiting_room);
    }
    if (wanted.length) {
      const rooms = [];
      for (const roomId of wanted) {
        const data = await apiGet('/api/waiting-rooms/' + encodeURIComponent(roomId) + '/queue');
        rooms.push(data.waiting_room);
      }
      return rooms;
    }
    const rooms = [];
    for (const department of claims.departments || []) {
      const data = await apiGet('/api/departments/' + encodeURIComponent(department) + '/queue');
      for (const entry of data.waiting_rooms || []) {
        rooms.push(entry.waiting_room);
      }
    }
    return rooms;
  }

  /** Refresh the waiting times in place (keeps focus and screen-reader position). */
  function tickQueues() {
    const now = Date.now();
    for (const node of queuesNode.querySelectorAll('.queue-line')) {
      const entry = consult.queues[node.dataset.roomId];
      const line = entry && entry.queue.find((q) => q.session_id === node.dataset.sessionId);
      const waitedNode = node.querySelector('.queue-waited');
      if (line && waitedNode) {
        waitedNode.textContent = 'waiting ' + waited(line.waiting_ms + (now - entry.receivedAt));
      }
    }
  }

  /** How staff see a patient: their name and reference, or the reference alone. */
  function patientLabel(entry) {
    const name = entry && entry.patient_name;
    const ref = entry && entry.patient_ref;
    return name ? name + ' (' + ref + ')' : ref || 'the patient';
  }

  const MEDIA_TEXT = { audio_only: 'voice only', video_only: 'no sound', none: 'no camera or microphone — phone instead?' };

  /** "camera denied · voice only" for a queue line, or '' when the devices work (or were not reported). */
  function devicesText(devices) {
    if (!devices || !devices.problems || devices.problems.length === 0) {
      return '';
    }
    const words = devices.problems.slice();
    if (MEDIA_TEXT[devices.media]) {
      words.push(MEDIA_TEXT[devices.media]);
    }
    return words.join(' · ');
  }

  function renderQueues() {
    const focused = document.activeElement;
    const refocus = focused && focused.classList && focused.classList.contains('admit') ? focused.dataset.sessionId : null;
    queuesNode.replaceChildren();
    const now = Date.now();
    let waiting = 0;
    const roomIds = Object.keys(consult.queues);
    for (const roomId of roomIds) {
      const { room, queue, receivedAt } = consult.queues[roomId];
      waiting += queue.length;
      const section = el('section', 'queue-room');
      section.dataset.roomId = roomId;
      if (roomIds.length > 1 || room.name) {
        const heading = el('h3', null, room.name || roomId);
        heading.appendChild(el('span', 'muted small', ' · ' + queue.length + ' waiting'));
        section.appendChild(heading);
      }
      if (queue.length === 0) {
        section.appendChild(el('p', 'muted empty', 'Nobody is waiting.'));
      }
      const list = el('ol', 'queue');
      for (const line of queue) {
        const item = el('li', 'queue-line');
        item.dataset.sessionId = line.session_id;
        item.dataset.roomId = roomId;
        item.dataset.arrival = line.arrival;
        item.appendChild(el('span', 'queue-position', line.position));
        const who = el('div', 'queue-who');
        // The name (when the clinic has one) and the reference on one line: "Anna Berg · p-123".
        const patient = el('span', 'queue-patient');
        if (line.patient_name) {
          patient.appendChild(el('strong', 'queue-name', line.patient_name));
          patient.appendChild(document.createTextNode(' · '));
        }
        const ref = el('span', line.patient_name ? 'queue-ref muted' : 'queue-ref', line.patient_ref);
        patient.appendChild(ref);
        who.appendChild(patient);
        const facts = el('span', 'queue-facts muted small');
        if (line.appointment_ms) {
          facts.appendChild(el('span', 'queue-appointment', 'appointment ' + dayAndClock(line.appointment_ms)));
          facts.appendChild(document.createTextNode(' · '));
        }
        facts.appendChild(el('span', 'queue-waited', 'waiting ' + waited(line.waiting_ms + (now - receivedAt))));
        who.appendChild(facts);
        const devices = devicesText(line.devices);
        if (devices) {
          // The device check advises: the clinician sees who comes by voice only, or without devices, and why.
          const node = el('span', 'queue-devices small', devices);
          node.dataset.media = line.devices.media;
          who.appendChild(node);
        }
        item.appendChild(who);
        const badge = el('span', 'badge', ARRIVAL_LABEL[line.arrival] || line.arrival);
        badge.dataset.arrival = line.arrival;
        item.appendChild(badge);
        const admit = el('button', 'primary admit', 'Admit');
        admit.type = 'button';
        admit.dataset.sessionId = line.session_id;
        admit.setAttribute('aria-label', 'Admit ' + patientLabel(line));
        admit.disabled = consult.state === 'in_call' || consult.state === 'wrapup';
        admit.addEventListener('click', () => admitPatient(line, admit));
        item.appendChild(admit);
        list.appendChild(item);
      }
      section.appendChild(list);
      queuesNode.appendChild(section);
    }
    if (roomIds.length === 0) {
      queuesNode.appendChild(el('p', 'muted empty', 'No waiting rooms found for your departments.'));
    }
    $('queue-summary').textContent =
      waiting === 0 ? 'Nobody is waiting' : waiting + ' waiting · updates live';
    if (refocus) {
      const again = queuesNode.querySelector('.admit[data-session-id="' + CSS.escape(refocus) + '"]');
      if (again) {
        again.focus();
      }
    }
  }

  function setQueue(roomId, queue) {
    const known = consult.queues[roomId];
    const room = (known && known.room) || { room_id: roomId, name: roomId };
    consult.queues[roomId] = { room: room, queue: queue || [], receivedAt: Date.now() };
    renderQueues();
  }

  function showClinicianIdle() {
    const rooms = Object.keys(consult.queues).length;
    say('queue', 'Connected as ' + desk.name + '. Watching ' + rooms + ' waiting room' + (rooms === 1 ? '' : 's') + '.');
  }

  async function admitPatient(line, button) {
    if (consult.state === 'in_call' || consult.state === 'wrapup') {
      return;
    }
    const who = patientLabel(line);
    await action(button, 'Cannot admit ' + who, async () => {
      const data = await desk.admit(line.session_id);
      consult.consultation = data.consultation;
      consult.sessionId = data.consultation.session_id;
      showSessionId(consult.sessionId);
      let session = desk;
      if (desk.room !== data.room) {
        session = await OpenConsult.connect({ token: data.token, room: data.room });
        wireErrors(session);
        wireMedia(session);
        session.on('chatMessage', ({ message }) => addChat(message));
        session.on('consultationChanged', ({ consultation }) => consultation && onClinicianConsultation(consultation));
        wireReconnect(session, () => resumeClinicianCall(session));
        session.on('disconnected', ({ left }) => {
          if (!left && consult.callSession === session) {
            stopCall();
            showError({ code: 'connection_closed', message: 'The call connection was lost' }, 'Disconnected');
          }
        });
      }
      consult.state = 'in_call';
      $('call-title').textContent = 'Consultation with ' + who;
      $('clinician-call-actions').hidden = false;
      $('wrapup').hidden = true;
      renderQueues();
      openChat(data.consultation.channel_id, 'Chat with ' + who + '. Messages are kept with the consultation.');
      say('in_call', 'In consultation with ' + who + '.');
      await startCall(session);
    });
  }

  function leaveCallSession() {
    const session = stopCall();
    if (session && session !== desk) {
      session.leave().catch(() => {});
    }
    stopLocalMedia();
  }

  function showWrapup(c) {
    consult.state = 'wrapup';
    $('clinician-call-actions').hidden = true;
    $('wrapup').hidden = false;
    $('complete-consultation').hidden = false;
    if (c.state === 'phone') {
      $('wrapup-title').textContent = 'Continued as a phone consultation';
      $('wrapup-detail').textContent = 'Call ' + patientLabel(c) + ' by phone now. Complete the consultation when the journal is pending.';
    } else {
      $('wrapup-title').textContent = 'Consultation ended';
      const lasted = typeof c.duration_ms === 'number' ? ' after ' + duration(c.duration_ms) : '';
      $('wrapup-detail').textContent = 'The video consultation with ' + patientLabel(c) + ' ended' + lasted + '. Complete it to mark the journal as pending.';
    }
    renderQueues();
    say('wrapup', $('wrapup-title').textContent + '.');
  }

  function onClinicianConsultation(c) {
    if (!consult.consultation || c.session_id !== consult.consultation.session_id) {
      return;
    }
    consult.consultation = c;
    if ((c.state === 'ended' || c.state === 'phone') && consult.state === 'in_call') {
      leaveCallSession();
      showWrapup(c);
    } else if ((c.state === 'completed' || c.state === 'journal_done' || c.state === 'cancelled') && consult.state !== 'queue') {
      finishConsultation(c);
    }
  }

  function finishConsultation(c) {
    leaveCallSession();
    $('wrapup').hidden = true;
    $('clinician-call-actions').hidden = true;
    consult.state = 'queue';
    renderQueues();
    showClinicianIdle();
    if (c.state === 'completed') {
      say('queue', 'Consultation with ' + patientLabel(c) + ' completed, waiting for the journal. Ready for the next patient.');
    }
  }

  $('end-consultation').addEventListener('click', () => {
    const c = consult.consultation;
    action($('end-consultation'), 'Cannot end the consultation', async () => {
      const data = await desk.endConsultation(c.session_id);
      onClinicianConsultation(data.consultation);
    });
  });

  $('phone-fallback').addEventListener('click', () => {
    const c = consult.consultation;
    action($('phone-fallback'), 'Cannot switch to phone', async () => {
      const data = await desk.phoneFallback(c.session_id);
      onClinicianConsultation(data.consultation);
    });
  });

  $('complete-consultation').addEventListener('click', () => {
    const c = consult.consultation;
    action($('complete-consultation'), 'Cannot complete the consultation', async () => {
      const data = await desk.complete(c.session_id);
      consult.consultation = data.consultation;
      finishConsultation(data.consultation);
    });
  });

  $('announce-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const text = $('announce-text').value.trim();
    const roomId = $('announce-room').value;
    if (!text || !roomId) {
      return;
    }
    action($('announce-post'), 'Cannot post the announcement', async () => {
      const data = await desk.postAnnouncement(roomId, text, { expiresInS: Number($('announce-expiry').value) });
      $('announce-text').value = '';
      addAnnouncement(data.announcement);
    });
  });

  async function startClinician() {
    say('connecting', 'Connecting…');
    try {
      desk = await OpenConsult.connect({ token: token });
    } catch (err) {
      showError(err, 'Cannot connect');
      return;
    }
    consult.session = desk;
    wireErrors(desk);
    wireMedia(desk);
    desk.on('queueUpdated', ({ room_id: roomId, queue }) => setQueue(roomId, queue));
    desk.on('announcement', ({ announcement }) => addAnnouncement(announcement));
    desk.on('chatMessage', ({ message }) => addChat(message));
    desk.on('consultationChanged', ({ consultation }) => consultation && onClinicianConsultation(consultation));
    wireReconnect(desk, () => {
      loadDesk();
      resumeClinicianCall(desk);
    });
    desk.on('disconnected', ({ code, reason, left }) => {
      if (left) {
        return;
      }
      stopCall();
      showError({ code: 'connection_closed', message: 'Connection to the server was lost (close code ' + code + (reason ? ', ' + reason : '') + '). Reload the page' }, 'Disconnected');
    });
    $('queue-panel').hidden = false;
    $('announce-panel').hidden = false;
    $('announcements-title').textContent = 'Current announcements';
    await loadDesk();
    // Waiting times tick on screen; expired announcements go away.
    setInterval(() => {
      tickQueues();
      renderAnnouncements();
    }, 15000);
  }

  /**
   * The clinician desk's load path, also run after a reconnect: the waiting rooms, their queues
   * and current announcements (`queue.watch`, which also brings `queueUpdated` again). A call in
   * progress keeps its place on screen.
   */
  async function loadDesk() {
    const busy = () => consult.state === 'in_call' || consult.state === 'wrapup';
    if (!busy()) {
      say('connecting', 'Loading the waiting rooms…');
    }
    try {
      const rooms = await findRooms();
      const select = $('announce-room');
      select.replaceChildren();
      consult.queues = {};
      consult.announcements = []; // queue.watch answers with every current one
      for (const room of rooms) {
        consult.queues[room.room_id] = { room: room, queue: [], receivedAt: Date.now() };
        const option = el('option', null, room.name || room.room_id);
        option.value = room.room_id;
        select.appendChild(option);
      }
      $('announce-room-label').hidden = rooms.length < 2;
      for (const room of rooms) {
        const data = await desk.watchQueue(room.room_id);
        setQueue(room.room_id, data.queue);
        for (const announcement of data.announcements || []) {
          addAnnouncement(announcement);
        }
      }
      renderQueues();
      renderAnnouncements();
      if (!busy()) {
        showClinicianIdle();
      }
    } catch (err) {
      if (busy()) {
        warn(err, 'Cannot load the waiting rooms');
      } else {
        showError(err, 'Cannot load the waiting rooms');
      }
    }
  }

  /**
   * A clinician connection came back: if it carries the call, read the consultation again (it may
   * have ended meanwhile) and go on with the call; the SDK publishes and resubscribes.
   */
  async function resumeClinicianCall(session) {
    const c = consult.consultation;
    if (!c || (consult.state !== 'in_call' && consult.state !== 'wrapup')) {
      return;
    }
    if (session === consult.callSession) {
      resumeCall(session);
    }
    refreshChat();
    try {
      const data = await session.getConsultation(c.session_id);
      if (data && data.consultation) {
        onClinicianConsultation(data.consultation);
      }
    } catch (err) {
      warn(err, 'Cannot read the consultation');
    }
  }

  // ---- group calls: who is in the call, screen sharing, guests -------------------------------

  const ROLE_LABEL = { patient: 'patient', clinician: 'clinician', guest: 'guest' };

  /** The call's participant list: the others in the call session, and for the clinician the guests' Remove. */
  function renderPeople() {
    const list = $('call-people');
    const session = consult.callSession;
    $('guests-panel').hidden = !(consult.view === 'clinician' && session);
    list.replaceChildren();
    consult.people = [];
    if (!session) {
      list.hidden = true;
      return;
    }
    list.hidden = false;
    list.appendChild(el('li', 'me', 'You (' + (ROLE_LABEL[session.role] || session.role) + ')'));
    for (const connection of session.connections.values()) {
      consult.people.push({ connection_id: connection.connection_id, name: connection.name, role: connection.role });
      const item = el('li', null, connection.name + ' (' + (ROLE_LABEL[connection.role] || connection.role) + ')');
      item.dataset.role = connection.role;
      list.appendChild(item);
    }
  }

  function wirePeople(session) {
    session.on('connectionCreated', () => session === consult.callSession && renderPeople());
    session.on('connectionDestroyed', () => session === consult.callSession && renderPeople());
    session.on('screenShareEnded', () => {
      if (consult.screenShare && session === consult.callSession) {
        consult.screenShare = null;
      }
      showShareButton();
    });
  }

  function showShareButton() {
    const button = $('share-screen');
    button.textContent = consult.screenShare ? 'Stop sharing your screen' : 'Share your screen';
    button.setAttribute('aria-pressed', consult.screenShare ? 'true' : 'false');
  }

  function stopScreenShare(session) {
    const share = consult.screenShare;
    consult.screenShare = null;
    showShareButton();
    if (share && session) {
      session.stopScreenShare().catch(() => {});
    }
  }

  $('share-screen').addEventListener('click', () => {
    const session = consult.callSession;
    if (!session) {
      return;
    }
    if (consult.screenShare) {
      stopScreenShare(session);
      return;
    }
    action($('share-screen'), 'Cannot share your screen', async () => {
      const publisher = await session.startScreenShare();
      if (consult.callSession !== session) {
        session.stopScreenShare().catch(() => {});
        return;
      }
      consult.screenShare = publisher;
      showShareButton();
    });
  });

  /** Clinician: the guests added in this call, each with their link to hand over and Remove. */
  function renderGuests() {
    const list = $('guest-list');
    list.replaceChildren();
    for (const guest of consult.guests) {
      const item = el('li', 'guest');
      item.dataset.guestId = guest.guest_id;
      item.appendChild(el('span', 'guest-name', guest.name + (guest.removed ? ' (removed)' : '')));
      if (!guest.removed) {
        const link = el('input', 'guest-link');
        link.readOnly = true;
        link.value = guest.guest_link;
        link.setAttribute('aria-label', 'Link for ' + guest.name);
        item.appendChild(link);
        const copy = el('button', 'link', 'Copy link');
        copy.type = 'button';
        copy.addEventListener('click', () => navigator.clipboard && navigator.clipboard.writeText(guest.guest_link).catch(() => {}));
        item.appendChild(copy);
        const remove = el('button', 'danger remove-guest', 'Remove');
        remove.type = 'button';
        remove.setAttribute('aria-label', 'Remove ' + guest.name + ' from the consultation');
        remove.addEventListener('click', () => action(remove, 'Cannot remove ' + guest.name, async () => {
          await desk.removeGuest(consult.consultation.session_id, guest.guest_id);
          guest.removed = true;
          renderGuests();
        }));
        item.appendChild(remove);
      }
      list.appendChild(item);
    }
  }

  if (view === 'clinician') {
    $('guest-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const name = $('guest-name').value.trim();
      const c = consult.consultation;
      if (!name || !c) {
        return;
      }
      action($('guest-invite'), 'Cannot add ' + name, async () => {
        const data = await desk.inviteGuest(c.session_id, name);
        const link = /^https?:/.test(data.guest_link) ? data.guest_link : window.location.origin + data.guest_link;
        consult.guests.push({ guest_id: data.guest.guest_id, name: data.guest.name, guest_link: link, removed: false });
        $('guest-name').value = '';
        renderGuests();
      });
    });
  }

  /** A guest: straight into the consultation's call; removed by the clinician, the page says so. */
  async function startGuest() {
    say('connecting', 'Connecting to the consultation…');
    let session;
    try {
      session = await OpenConsult.connect({ token: token });
    } catch (err) {
      showError(err, err && err.code === 'forbidden'
        ? 'This link no longer works (the clinician removed it, or the consultation is over)'
        : 'Cannot join the consultation');
      return;
    }
    consult.session = session;
    consult.sessionId = session.sessionId;
    showSessionId(session.sessionId);
    wireErrors(session);
    wireMedia(session);
    session.on('removedFromCall', () => {
      stopCall();
      stopLocalMedia();
      consult.state = 'ended';
      $('finished').hidden = false;
      $('finished-title').textContent = 'You were removed from the consultation';
      $('finished-detail').textContent = 'The clinician ended your part in this call. Your link no longer works.';
      say('ended', 'You were removed from the consultation.');
    });
    wireReconnect(session, () => resumeCall(session));
    session.on('disconnected', ({ code, reason, left }) => {
      if (left || consult.state === 'ended') {
        return;
      }
      stopCall();
      showError({ code: 'connection_closed', message: 'The connection to the call was lost (close code ' + code + (reason ? ', ' + reason : '') + '). Open your link again' }, 'Disconnected');
    });
    consult.state = 'in_call';
    $('call-title').textContent = 'Video consultation';
    $('guest-call-actions').hidden = false;
    say('in_call', 'In the consultation as ' + session.name + '.');
    await startCall(session);
  }

  if (view === 'guest') {
    $('guest-hangup').addEventListener('click', () => {
      const session = stopCall();
      stopLocalMedia();
      consult.state = 'ended';
      if (session) {
        session.leave().catch(() => {});
      }
      $('guest-call-actions').hidden = true;
      $('finished').hidden = false;
      $('finished-title').textContent = 'You left the consultation';
      $('finished-detail').textContent = 'Open your link again to rejoin while the consultation lasts.';
      say('ended', 'You left the consultation.');
    });
  }

  if (view === 'guest') {
    startGuest();
  } else if (view === 'patient') {
    setInterval(renderAnnouncements, 15000);
    if (walkInToken) {
      startWalkIn();
    } else {
      startPatient();
    }
  } else {
    startClinician();
  }
})();
