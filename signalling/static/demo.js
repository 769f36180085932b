/*
 * OpenConsult demo page logic (signalling/static/index.html), built on the SDK in openconsult.js.
 *
 * Join by display name + room + role (a token is fetched from POST /api/demo/token) or with a
 * pasted token; preview and publish the camera; subscribe to every remote stream and show it in
 * a labelled tile. When the connection drops the SDK rejoins by itself: the page says
 * "Reconnecting… (attempt N)", keeps the local preview, and remote tiles come back as the
 * streams are announced again. Query parameters `?room=…&name=…&role=…&autojoin=1` pre-fill and auto-join;
 * `&ice=relay` sends all media through the TURN server (a test of the deployment's TURN);
 * `#token=…` (or `?token=…`) pre-fills the token unless it is a consultation link (then consultation.js runs the page).
 * "Share screen" publishes the screen as a second stream; the others show it as the big tile of a
 * grid that reflows (up to 6+ people, also on a phone).
 *
 * For tests and support staff the page exposes `window.demo`:
 *   demo.state            'idle' | 'joining' | 'joined' | 'reconnecting' | 'error'
 *   demo.states           every state the page went through, in order (no repeats in a row)
 *   demo.reconnecting     {attempt, code} while reconnecting, else null
 *   demo.reconnects       how many times the page got back after losing the connection
 *   demo.error            {code, message} of the last error, or null
 *   demo.sessionId        the session id (also shown on screen)
 *   demo.session          the OpenConsult Session
 *   demo.sessionErrors    [{code, message}] of background failures (e.g. a rejected `ice`)
 *   demo.mediaFailure     {kind, reason, code, streamId, attempt, retrying, text} while a media connection
 *                         is failing (not up within the SDK's deadline, or failed): also on the status
 *                         line in plain words; null once it is up again
 *   demo.join() / demo.leave()
 *   demo.screenShare      the Publisher of this page's screen share, or null
 *   await demo.startScreenShare() / demo.stopScreenShare()   (the "Share screen" button)
 *   await demo.inboundVideoStats()  → [{subscriptionId, streamId, framesDecoded, …}]
 */
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const form = $('join-form');
  const joinButton = $('join');
  const leaveButton = $('leave');
  const shareButton = $('demo-share');
  const statusLine = $('status');
  const videos = $('videos');
  const localTile = $('local-tile');
  const localVideo = $('local-video');

  const demo = {
    state: 'idle',
    states: ['idle'],
    reconnecting: null,
    reconnects: 0,
    error: null,
    warning: null,
    sessionId: null,
    connectionId: null,
    session: null,
    publisher: null,
    localStream: null,
    subscriptions: new Map(), // stream id → Subscription
    sessionErrors: [], // background request failures, e.g. a rejected ICE candidate
    mediaFailure: null,
    join: join,
    leave: leave,
    screenShare: null,
    startScreenShare: startScreenShare,
    stopScreenShare: stopScreenShare,
    inboundVideoStats: inboundVideoStats,
  };
  window.demo = demo;

  let leaving = false;
  let mediaReady = Promise.resolve();

  // ---- status line -------------------------------------------------------------------------

  function setStatus(state, text) {
    if (demo.states[demo.states.length - 1] !== state) {
      demo.states.push(state);
    }
    demo.state = state;
    statusLine.dataset.state = state;
    statusLine.textContent = text;
  }

  function describe(err) {
    const code = (err && err.code) || (err && err.name) || 'error';
    const message = (err && err.message) || String(err);
    return { code: code, message: message };
  }

  function showError(err, context) {
    const error = describe(err);
    demo.error = error;
    statusLine.dataset.code = error.code;
    setStatus('error', (context ? context + ': ' : 'Error: ') + error.message + ' [' + error.code + ']');
    console.error('OpenConsult demo:', error.code, error.message);
  }

  function joinedText() {
    const session = demo.session;
    const others = session.connections.size;
    let text =
      'Connected to room "' + session.room + '" as ' + session.name + ' (' + session.role + '). ' +
      (others === 0 ? 'Nobody else is here yet.' : others + ' other participant' + (others === 1 ? '' : 's') + '.');
    if (demo.warning) {
      text += ' Warning: ' + demo.warning.message + ' [' + demo.warning.code + ']';
    }
    return text;
  }

  function refreshJoinedStatus() {
    if (demo.state === 'joined' && demo.session) {
      setStatus('joined', joinedText());
    }
  }

  function warn(err, context) {
    const error = describe(err);
    demo.warning = { code: error.code, message: context + ': ' + error.message };
    console.warn('OpenConsult demo:', error.code, context, error.message);
    refreshJoinedStatus();
  }

  function setFormEnabled(enabled) {
    for (const element of form.querySelectorAll('input, select, textarea')) {
      element.disabled = !enabled;
    }
    joinButton.disabled = !enabled;
    leaveButton.disabled = enabled;
    shareButton.disabled = enabled;
  }

  // ---- tokens ------------------------------------------------------------------------------

  async function fetchToken(room, name, role) {
    let response;
    try {
      response = await fetch('/api/demo/token', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ room: room, name: name, role: role }),
      });
    } catch (err) {
      throw new OpenConsult.OpenConsultError('connection_failed', 'Cannot reach the server for a token');
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok || !body || !body.token) {
      const error = (body && (body.error || body)) || {};
      throw new OpenConsult.OpenConsultError(
        error.code || 'http_' + response.status,
        error.message || 'Token request failed with HTTP ' + response.status,
      );
    }
    return body.token;
  }

  // ---- tiles -------------------------------------------------------------------------------

  const Tiles = window.OpenConsultTiles;

  function tileId(streamId) {
    return Tiles.tileId('tile-', streamId);
  }

  function streamLabel(stream) {
    const connection = demo.session && demo.session.connections.get(stream.connection_id);
    let label = (connection && connection.name) || stream.name || 'Guest';
    if (connection && connection.role) {
      label += ' (' + connection.role + ')';
    }
    if (stream.video_source === 'screen') {
      label += ' — screen';
    }
    return label;
  }

  function addTile(stream, subscription) {
    removeTile(stream.stream_id);
    const tile = Tiles.create({
      id: tileId(stream.stream_id), streamId: stream.stream_id, label: streamLabel(stream),
      mediaStream: subscription.mediaStream,
    });
    // A screen share is the big tile: first in the grid, full width.
    tile.figure.classList.toggle('screen', stream.video_source === 'screen');
    videos.appendChild(tile.figure);
    tile.start();
  }

  function removeTile(streamId) {
    Tiles.remove(tileId(streamId));
  }

  function removeAllTiles() {
    for (const figure of Array.from(videos.querySelectorAll('.tile.remote'))) {
      removeTile(figure.dataset.streamId);
    }
    localVideo.srcObject = null;
    localTile.hidden = true;
  }

  // ---- subscriptions -----------------------------------------------------------------------

  async function subscribeTo(stream) {
    const session = demo.session;
    if (demo.subscriptions.has(stream.stream_id)) {
      return;
    }
    // Reserve the slot so an event racing the join response does not subscribe twice.
    demo.subscriptions.set(stream.stream_id, null);
    // Subscribe after camera access settles: the browser exposes its real host candidates
    // (not mDNS names) only once media permission is granted.
    await mediaReady;
    if (session !== demo.session || !session.streams.has(stream.stream_id)) {
      demo.subscriptions.delete(stream.stream_id);
      return;
    }
    try {
      const subscription = await session.subscribe(stream.stream_id);
      if (session !== demo.session || !session.streams.has(stream.stream_id)) {
        subscription.unsubscribe().catch(() => {});
        demo.subscriptions.delete(stream.stream_id);
        return;
      }
      demo.subscriptions.set(stream.stream_id, subscription);
      subscription.on('ended', () => {
        if (demo.subscriptions.get(stream.stream_id) === subscription) {
          demo.subscriptions.delete(stream.stream_id);
          removeTile(stream.stream_id);
        }
      });
      addTile(stream, subscription);
    } catch (err) {
      demo.subscriptions.delete(stream.stream_id);
      if (session === demo.session && session.state === 'connected') {
        warn(err, 'Cannot receive ' + streamLabel(stream));
      }
    }
  }

  // ---- join / leave ------------------------------------------------------------------------

  function readForm() {
    return {
      name: $('name').value.trim(),
      room: $('room').value.trim(),
      role: $('role').value,
      token: $('token').value.trim(),
    };
  }

  async function join() {
    if (demo.state === 'joining' || demo.state === 'joined') {
      return;
    }
    const input = readForm();
    demo.error = null;
    demo.warning = null;
    demo.sessionErrors = [];
    demo.mediaFailure = null;
    demo.reconnecting = null;
    delete statusLine.dataset.code;
    leaving = false;
    setFormEnabled(false);
    setStatus('joining', 'Connecting…');
    let session = null;
    try {
      let token = input.token;
      let room;
      if (!token) {
        if (!input.room || !input.name) {
          throw new OpenConsult.OpenConsultError('invalid_argument', 'Enter a display name and a room, or paste a token');
        }
        setStatus('joining', 'Getting a token…');
        token = await fetchToken(input.room, input.name, input.role);
        room = input.room;
      }
      setStatus('joining', 'Joining…');
      // ?ice=relay sends all media through the deployment's TURN server: a connection test.
      const relayOnly = new URLSearchParams(location.search).get('ice') === 'relay';
      session = await OpenConsult.connect({ token: token, room: room, iceTransportPolicy: relayOnly ? 'relay' : 'all' });
      demo.session = session;
      demo.sessionId = session.sessionId;
      demo.connectionId = session.connectionId;
      $('session-id').textContent = session.sessionId;
      $('session-line').hidden = false;
      wireSession(session);

      // Camera and microphone; a failure leaves the user joined but receive-only.
      let ready;
      mediaReady = new Promise((resolve) => (ready = resolve));
      for (const stream of session.streams.values()) {
        subscribeTo(stream);
      }
      setStatus('joining', 'Starting camera…');
      try {
        demo.localStream = await navigator.mediaDevices.getUserMedia({
          audio: true,
          video: { width: 640, height: 480 },
        });
        session.reportDeviceCheck('ok', 'ok', null);
      } catch (err) {
        demo.localStream = null;
        const kind = OpenConsult.deviceErrorKind(err);
        session.reportDeviceCheck(kind, kind, err, { audio: true, video: true });
        warn({ code: 'media_unavailable', message: (err.name || 'Error') + ': ' + err.message }, 'No camera or microphone, receiving only');
      } finally {
        ready();
      }
      if (session !== demo.session) {
        return; // Left while the camera was starting.
      }
      if (demo.localStream) {
        localVideo.srcObject = demo.localStream;
        $('local-label').textContent = 'You (' + session.name + ')';
        localTile.hidden = false;
        localVideo.play().catch(() => {});
        await publishCamera(session);
      }
      if (session === demo.session && session.state === 'connected') {
        setStatus('joined', joinedText());
      }
    } catch (err) {
      cleanup();
      if (session) {
        session.leave().catch(() => {});
      }
      showError(err, 'Cannot join');
      setFormEnabled(true);
    }
  }

  /** Send the camera; the SDK publishes it again by itself after a reconnect. */
  async function publishCamera(session) {
    try {
      // ?codec=h264 publishes H264 instead of VP8 (relayed as is: a codec test).
      const videoCodec = new URLSearchParams(location.search).get('codec') === 'h264' ? 'H264' : 'VP8';
      const publisher = await session.publish(demo.localStream, {
        name: session.name, videoSource: 'camera', videoCodec: videoCodec,
      });
      if (session !== demo.session) {
        return;
      }
      demo.publisher = publisher;
      publisher.on('ended', ({ error }) => {
        if (demo.publisher === publisher) {
          demo.publisher = null;
          warn(error, 'Cannot send your video');
        }
      });
    } catch (err) {
      if (session === demo.session && session.state === 'connected') {
        warn(err, 'Cannot send your video');
      }
    }
  }

  function wireSession(session) {
    session.on('screenShareEnded', () => {
      if (session === demo.session) {
        demo.screenShare = null;
        showShare();
      }
    });
    session.on('connectionCreated', refreshJoinedStatus);
    session.on('connectionDestroyed', refreshJoinedStatus);
    session.on('streamCreated', ({ stream }) => subscribeTo(stream));
    session.on('streamDestroyed', ({ stream }) => {
      const subscription = demo.subscriptions.get(stream.stream_id);
      demo.subscriptions.delete(stream.stream_id);
      if (subscription) {
        subscription.unsubscribe().catch(() => {});
      }
      removeTile(stream.stream_id);
    });
    session.on('reconnecting', ({ attempt, code }) => {
      if (session !== demo.session || leaving) {
        return;
      }
      // The local preview stays; remote tiles went with their subscriptions ('ended').
      demo.reconnecting = { attempt: attempt, code: code };
      setStatus('reconnecting', 'Reconnecting… (attempt ' + attempt + ', connection lost with close code ' + code + ')');
    });
    session.on('reconnected', () => {
      if (session !== demo.session || leaving) {
        return;
      }
      demo.reconnecting = null;
      demo.reconnects += 1;
      demo.sessionId = session.sessionId; // a new one if the server restarted
      demo.connectionId = session.connectionId;
      $('session-id').textContent = session.sessionId;
      // Not sending yet (the camera started while the connection was down)? Send now.
      if (demo.localStream && (!demo.publisher || demo.publisher.closed)) {
        publishCamera(session);
      }
      if (demo.state === 'reconnecting') {
        setStatus('joined', joinedText());
      }
    });
    session.on('disconnected', ({ code, reason, error, attempts }) => {
      if (session !== demo.session || leaving) {
        return;
      }
      cleanup();
      demo.reconnecting = null;
      let message = 'Connection to the server was lost (close code ' + code + (reason ? ', ' + reason : '') + ')';
      if (error && attempts) {
        message += '; reconnecting failed after ' + attempts + ' attempt' + (attempts === 1 ? '' : 's') + ': ' + error.message;
      }
      // A refused rejoin (e.g. an expired token) shows the server's code; otherwise connection_closed.
      const refused = error && ['connection_failed', 'connection_closed', 'timeout'].indexOf(error.code) === -1;
      showError({ code: refused ? error.code : 'connection_closed', message: message }, 'Disconnected');
      setFormEnabled(true);
    });
    // A media connection not up in time (or failed): say so, and what to try; the SDK retries.
    session.on('mediaFailed', (event) => {
      if (session !== demo.session || leaving) {
        return;
      }
      const text = OpenConsult.mediaFailureText(event);
      demo.mediaFailure = {
        kind: event.kind, reason: event.reason, code: event.error.code, streamId: event.streamId,
        attempt: event.attempt, retrying: event.retrying, text: text,
      };
      warn({ code: event.error.code, message: text }, 'Media not connected');
    });
    session.on('mediaConnected', ({ peerId }) => {
      const failure = demo.mediaFailure;
      const subscription = session.subscriptions.get(peerId);
      const recovered = failure && (failure.kind === 'publish' ? session.publishers.has(peerId)
        : Boolean(subscription && subscription.streamId === failure.streamId));
      if (session === demo.session && recovered) {
        demo.mediaFailure = null;
        demo.warning = null;
        refreshJoinedStatus();
      }
    });
    session.on('error', (err) => {
      // Failures outside a user action (e.g. a rejected ICE candidate): kept for tests and support.
      demo.sessionErrors.push({ code: err.code, message: err.message });
      console.warn('OpenConsult session error', err.code, err.message);
    });
  }

  // ---- screen sharing ----------------------------------------------------------------------

  function showShare() {
    shareButton.textContent = demo.screenShare ? 'Stop sharing' : 'Share screen';
    shareButton.setAttribute('aria-pressed', demo.screenShare ? 'true' : 'false');
  }

  /** Share the screen as a second stream (the SDK asks the browser with getDisplayMedia). */
  async function startScreenShare() {
    const session = demo.session;
    if (!session || demo.screenShare) {
      return demo.screenShare;
    }
    try {
      const publisher = await session.startScreenShare();
      if (session !== demo.session) {
        session.stopScreenShare().catch(() => {});
        return null;
      }
      demo.screenShare = publisher;
      showShare();
      return publisher;
    } catch (err) {
      warn(err, 'Cannot share your screen');
      return null;
    }
  }

  async function stopScreenShare() {
    const session = demo.session;
    demo.screenShare = null;
    showShare();
    if (session) {
      await session.stopScreenShare();
    }
  }

  function cleanup() {
    demo.screenShare = null;
    showShare();
    if (demo.localStream) {
      for (const track of demo.localStream.getTracks()) {
        track.stop();
      }
    }
    demo.localStream = null;
    demo.publisher = null;
    demo.subscriptions.clear();
    demo.session = null;
    removeAllTiles();
  }

  async function leave() {
    const session = demo.session;
    leaving = true;
    cleanup();
    if (session) {
      await session.leave();
    }
    setStatus('idle', 'You left the session.');
    setFormEnabled(true);
  }

  // ---- stats for tests and support -----------------------------------------------------------

  function inboundVideoStats() {
    return OpenConsult.inboundVideoStats(demo.subscriptions);
  }

  // ---- wiring ------------------------------------------------------------------------------

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    join();
  });
  leaveButton.addEventListener('click', () => leave());
  shareButton.addEventListener('click', () => (demo.screenShare ? stopScreenShare() : startScreenShare()));
  $('copy-session').addEventListener('click', () => {
    if (demo.sessionId && navigator.clipboard) {
      navigator.clipboard.writeText(demo.sessionId).catch(() => {});
    }
  });

  const params = OpenConsult.pageParams();
  if (params.has('name')) {
    $('name').value = params.get('name');
  }
  if (params.has('room')) {
    $('room').value = params.get('room');
  }
  if (params.get('role') === 'patient' || params.get('role') === 'clinician') {
    $('role').value = params.get('role');
  }
  // A consultation link (#token=…) is shown by consultation.js; any other token is pre-filled.
  const consultationPage = Boolean(window.consult && window.consult.active);
  if (params.has('token') && !consultationPage) {
    $('token').value = params.get('token');
    $('token-details').open = true;
  }
  if (params.get('autojoin') === '1' && !consultationPage) {
    join();
  }
})();
