/*
 * OpenConsult browser SDK: the client side of wire protocol v1 (docs/protocol.md).
 *
 * Plain modern JavaScript, no build step, no dependencies. Loaded with a classic
 * <script src="/static/openconsult.js"> it defines the global `OpenConsult`; the same
 * file also works with CommonJS-style loaders that provide `module.exports`.
 *
 *   const session = await OpenConsult.connect({ url, token });
 *   session.on('streamCreated', ({ stream }) => session.subscribe(stream.stream_id));
 *   const publisher = await session.publish(mediaStream, { name: 'Camera' });
 *   const subscription = await session.subscribe(streamId);
 *   video.srcObject = subscription.mediaStream;
 *   await session.leave();
 *
 * The clinical workflow (waiting room, queue, consultation, chat, announcements) uses the same
 * session: `session.request(type, fields)` sends any request, and thin helpers wrap each one:
 *
 *   const check = await OpenConsult.checkDevices();   // patient: advice only, never a gate
 *   const place = await session.enterWaitingRoom({ devices: check });
 *   session.on('positionChanged', ({ position }) => …);
 *   session.on('admitted', () => …);                       // then publish and subscribe
 *   const { queue } = await session.watchQueue('wr-cardio'); // staff; then 'queueUpdated'
 *   const { token, room } = await session.admit(sessionId);  // clinician
 *   await session.sendChat(channelId, text);                 // 'chatMessage' to the others
 *
 *   const { consultation } = await session.getConsultation(); // its state, e.g. after a reload
 *
 * Other helpers: leaveWaitingRoom, unwatchQueue, transfer, endConsultation, complete,
 * phoneFallback, chatHistory, postAnnouncement. Workflow events (`OpenConsult.WORKFLOW_EVENTS`):
 * queueUpdated, positionChanged, admitted, consultationChanged, chatMessage, announcement,
 * removedFromQueue.
 * `OpenConsult.decodeToken(jwt)` reads a token's claims (unverified) so a page can pick its view.
 * `OpenConsult.pageParams()` reads a page's parameters from its query and its fragment (join links
 * carry their token as `/#token=…`; an old `/?token=…` is moved into the fragment).
 * `OpenConsult.walkIn({ token, name })` trades a shared walk-in link's token for the patient's own
 * (`POST /api/walk-in`): `{consultation, position, patient_token, …}`; then connect with it.
 *
 * Screen sharing is a second stream of the same participant (video_source `screen`):
 *
 *   const share = await session.startScreenShare();   // getDisplayMedia; resolves with a Publisher
 *   session.on('screenShareEnded', () => …);           // stopped here or from the browser's own bar
 *   await session.stopScreenShare();
 *
 * Guests (a relative, an interpreter; role `guest`) are added by the clinician:
 *
 *   const { guest, guest_link } = await session.inviteGuest(sessionId, 'Ida (interpreter)');
 *   await session.removeGuest(sessionId, guest.guest_id);   // the guest gets `removedFromCall`
 *
 * What the browser saw reaches the support inspector (docs/protocol.md, client.event /
 * client.stats): the SDK reports ICE/connection failures with the candidate types it had,
 * reconnecting/reconnected, page hidden/visible, the tab closing (a beacon), and every 5 s a
 * getStats() summary per track; pages report their device check with
 * `session.reportDeviceCheck(camera, microphone, error)` (`OpenConsult.deviceErrorKind(err)` names
 * a getUserMedia error) and anything else with `session.reportEvent(name, data)`.
 * `OpenConsult.checkDevices()` is the device check (advice only: waits for the permission prompt,
 * probes camera and microphone apart); `OpenConsult.runPrecallTest(options)` the pre-call network
 * test through the server, `OpenConsult.precallVerdict(figures)` its rules. Options
 * `clientReports: false` turns this off, `statsInterval` (ms, default 5000; 0: no stats) paces it.
 *
 * No silent hangs: a peer connection not connected within `mediaConnectTimeout` (ms, default 15000)
 * fails like one whose ICE failed. Either way the session emits `mediaFailed` ({kind: 'publish' |
 * 'subscribe', reason: 'timeout' | 'failed', streamId, peerId, attempt, maxAttempts, retrying, error})
 * and rebuilds it after a pause (2 s, doubling), at most `OpenConsult.MAX_MEDIA_RESTARTS` times: then a
 * publisher ends (`ended`) and a subscription just ends (`subscriptionEnded`). `mediaConnected`
 * ({peerId}) says a peer connection is up.
 * `OpenConsult.mediaFailureText(event)` says it in plain words with what to try.
 *
 * Server design decides the shape of the media side: one RTCPeerConnection per published
 * stream and one per subscription. The server puts all its candidates in its SDP; the client
 * trickles its own with `ice` messages addressed by `peer_id` (stream id or subscription id).
 */
(function (root, factory) {
  'use strict';
  const api = factory();
  if (typeof module === 'object' && module && module.exports) {
    module.exports = api;
  }
  if (root) {
    root.OpenConsult = api;
  }
})(typeof globalThis !== 'undefined' ? globalThis : this, function () {
  'use strict';

  const VERSION = '0.1.0';
  const PROTOCOL = 'openconsult.v1';

  // Events a session emits to `session.on(...)` listeners.
  const SESSION_EVENTS = [
    'streamCreated',
    'streamDestroyed',
    'connectionCreated',
    'connectionDestroyed',
    'subscriptionEnded',
    'screenShareEnded',
    'removedFromCall',
    'reconnecting',
    'reconnected',
    'disconnected',
    'mediaFailed',
    'mediaConnected',
    'error',
  ];

  // Close codes after which rejoining cannot help: a refused join or abusive input.
  const FINAL_CLOSE_CODES = [1008, 1009, 4001];
  // Join failures worth another try; any other error code from the server refuses the token.
  // (`draining`: the node reached is draining and no other node could take the room, yet.)
  const RETRYABLE_CODES = ['connection_failed', 'connection_closed', 'timeout', 'internal_error', 'rate_limited',
    'draining'];
  // How often one stream's peer connection is rebuilt after it failed (ICE broke) or timed out.
  const MAX_MEDIA_RESTARTS = 3;
  // A peer connection not connected (ICE and DTLS) by then has failed (connect option mediaConnectTimeout).
  const MEDIA_CONNECT_TIMEOUT_MS = 15000;
  // Pause before the first rebuild of a failed peer connection; doubles for each further one.
  const MEDIA_RETRY_DELAY_MS = 2000;

  /** The pause before rebuilding a stream's peer connection after its `failures`-th failure. */
  function mediaRetryDelay(failures) {
    return MEDIA_RETRY_DELAY_MS * Math.pow(2, Math.max(0, failures - 1));
  }
  // Client reports (docs/protocol.md, client.event / client.stats): what the browser saw.
  const CLIENT_EVENT_NAMES = ['deviceCheck', 'getUserMediaFailed', 'iceFailed', 'connectionFailed', 'reconnecting',
    'reconnected', 'pageHidden', 'pageVisible', 'tabClosed', 'precallTest'];
  const CANDIDATE_TYPES = ['host', 'srflx', 'prflx', 'relay'];
  // Reports kept while the socket is down (sent once joined again); older ones beyond are dropped.
  const MAX_QUEUED_REPORTS = 20;
  const MAX_STATS_SAMPLES = 16;
  // getStats() fields copied as they are (W3C names), per direction.
  const RECV_STATS = ['framesDecoded', 'framesDropped', 'freezeCount', 'totalFreezesDuration', 'jitterBufferDelay',
    'concealedSamples', 'packetsReceived', 'bytesReceived', 'frameWidth', 'frameHeight', 'framesPerSecond'];
  const SEND_STATS = ['bytesSent', 'frameWidth', 'frameHeight', 'framesPerSecond'];

  // Workflow events (docs/protocol.md, "Workflow events"), emitted with the server's data as is.
  const WORKFLOW_EVENTS = [
    'queueUpdated',
    'positionChanged',
    'admitted',
    'consultationChanged',
    'chatMessage',
    'announcement',
    'removedFromQueue',
  ];
  for (const name of WORKFLOW_EVENTS) {
    SESSION_EVENTS.push(name);
  }

  /**
   * An Error with a protocol error code (`unauthorized`, `not_found`, …) and, when the
   * server sent one, the request type that failed. Client-side failures use their own
   * codes: `connection_failed`, `connection_closed`, `timeout`, `media_error`.
   */
  class OpenConsultError extends Error {
    constructor(code, message, details) {
      super(message || code);
      this.name = 'OpenConsultError';
      this.code = code;
      if (details) {
        Object.assign(this, details);
      }
    }
  }

  /** Minimal event emitter: listener exceptions are reported, never allowed to break the SDK. */
  class Emitter {
    constructor() {
      this._listeners = new Map();
    }

    /** Register `callback` for `event`; returns a function that removes it. */
    on(event, callback) {
      if (typeof callback !== 'function') {
        throw new TypeError('callback must be a function');
      }
      if (!this._listeners.has(event)) {
        this._listeners.set(event, new Set());
      }
      this._listeners.get(event).add(callback);
      return () => this.off(event, callback);
    }

    off(event, callback) {
      const set = this._listeners.get(event);
      if (set) {
        set.delete(callback);
      }
    }

    once(event, callback) {
      const remove = this.on(event, (...args) => {
        remove();
        callback(...args);
      });
      return remove;
    }

    _emit(event, ...args) {
      const set = this._listeners.get(event);
      if (!set) {
        return;
      }
      for (const callback of Array.from(set)) {
        try {
          callback(...args);
        } catch (err) {
          // A broken listener must not stop the others or the message loop.
          console.error('OpenConsult: "' + event + '" listener failed', err);
        }
      }
    }
  }

  function defaultUrl() {
    if (typeof location === 'undefined') {
      throw new OpenConsultError('invalid_argument', 'url is required outside a browser page');
    }
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return scheme + '//' + location.host + '/ws';
  }

  /** The HTTP(S) URL of `path` on the server of a ws(s):// URL. */
  function httpUrl(wsUrl, path) {
    const url = new URL(wsUrl, typeof location !== 'undefined' ? location.href : undefined);
    url.protocol = url.protocol === 'wss:' ? 'https:' : 'http:';
    url.pathname = path;
    url.search = '';
    url.hash = '';
    return url.toString();
  }

  /** A finite number >= 0, else null (what the stats schema accepts). */
  function statNumber(value) {
    return typeof value === 'number' && isFinite(value) && value >= 0 ? Math.min(value, 1e15) : null;
  }

  /** Text a client report may carry: no control characters, at most `max` characters. */
  function reportText(value, max) {
    return String(value === undefined || value === null ? '' : value)
      .replace(/[\u0000-\u001f\u007f-\u009f]/g, ' ')
      .slice(0, max);
  }

  /**
   * What a getUserMedia error says about a device, as the `deviceCheck` event names it:
   * 'denied' | 'not_found' | 'in_use' | 'error'.
   */
  function deviceErrorKind(err) {
    const name = err && err.name;
    if (name === 'NotAllowedError' || name === 'SecurityError' || name === 'PermissionDeniedError') {
      return 'denied';
    }
    if (name === 'NotFoundError' || name === 'DevicesNotFoundError' || name === 'OverconstrainedError') {
      return 'not_found';
    }
    if (name === 'NotReadableError' || name === 'TrackStartError' || name === 'AbortError') {
      return 'in_use';
    }
    return 'error';
  }

  /**
   * The device check, advice only: ask for camera and microphone and wait as long as the person
   * takes to answer the browser's prompt (no time limit). When both together fail, ask for each on
   * its own, so one refused or missing device does not hide the other. Resolves (never rejects)
   * `{stream, camera, microphone, error}`: `stream` holds whatever works (audio only, video only,
   * both, or null), `camera` / `microphone` each 'ok' | 'denied' | 'not_found' | 'in_use' | 'error'
   * (the `deviceCheck` event's and `waiting_room.enter`'s words), `error` the first getUserMedia error.
   */
  async function checkDevices(options) {
    const media = (typeof navigator !== 'undefined' && navigator.mediaDevices) || null;
    const video = (options && options.video) || { width: 640, height: 480 };
    if (!media || !media.getUserMedia) {
      const error = { name: 'NotSupportedError', message: 'this browser cannot use a camera or microphone here' };
      return { stream: null, camera: 'error', microphone: 'error', error: error };
    }
    try {
      const stream = await media.getUserMedia({ audio: true, video: video });
      return {
        stream: stream,
        camera: stream.getVideoTracks().length ? 'ok' : 'not_found',
        microphone: stream.getAudioTracks().length ? 'ok' : 'not_found',
        error: null,
      };
    } catch (both) {
      const tracks = [];
      const one = async (constraints) => {
        try {
          const stream = await media.getUserMedia(constraints);
          tracks.push(...stream.getTracks());
          return 'ok';
        } catch (err) {
          return deviceErrorKind(err);
        }
      };
      const microphone = await one({ audio: true, video: false });
      const camera = await one({ audio: false, video: video });
      return {
        stream: tracks.length ? new MediaStream(tracks) : null,
        camera: camera,
        microphone: microphone,
        error: both,
      };
    }
  }

  /** A DOMException's name as the schema allows it (letters, digits, underscore; 64 at most). */
  function errorName(err) {
    return reportText((err && err.name) || 'Error', 64).replace(/[^A-Za-z0-9_]/g, '');
  }

  /** The selected candidate pair of a stats report and its two candidates, or null. */
  function selectedPair(report) {
    const byId = new Map();
    report.forEach((stat) => byId.set(stat.id, stat));
    let pair = null;
    report.forEach((stat) => {
      if (stat.type === 'transport' && stat.selectedCandidatePairId && byId.has(stat.selectedCandidatePairId)) {
        pair = byId.get(stat.selectedCandidatePairId);
      }
    });
    if (!pair) {
      report.forEach((stat) => {
        if (!pair && stat.type === 'candidate-pair' && stat.nominated && stat.state === 'succeeded') {
          pair = stat;
        }
      });
    }
    if (!pair) {
      return null;
    }
    const local = byId.get(pair.localCandidateId) || {};
    const remote = byId.get(pair.remoteCandidateId) || {};
    return {
      stat: pair,
      json: {
        local_type: CANDIDATE_TYPES.indexOf(local.candidateType) >= 0 ? local.candidateType : null,
        remote_type: CANDIDATE_TYPES.indexOf(remote.candidateType) >= 0 ? remote.candidateType : null,
        protocol: local.protocol === 'udp' || local.protocol === 'tcp' ? local.protocol : null,
      },
    };
  }

  /**
   * One `client.stats` sample per track of one peer connection (docs/protocol.md): the
   * inbound-rtp (recv) or outbound-rtp (send) figures, RTT, and the selected pair's types.
   */
  async function statsSamples(pc, streamId, subscriptionId, direction) {
    let report;
    try {
      report = await pc.getStats();
    } catch (err) {
      return [];
    }
    const byId = new Map();
    report.forEach((stat) => byId.set(stat.id, stat));
    const pair = selectedPair(report);
    const wanted = direction === 'send' ? 'outbound-rtp' : 'inbound-rtp';
    const samples = [];
    report.forEach((stat) => {
      const kind = stat.kind || stat.mediaType;
      if (stat.type !== wanted || (kind !== 'audio' && kind !== 'video')) {
        return;
      }
      const sample = { stream_id: streamId, kind: kind, direction: direction };
      if (subscriptionId) {
        sample.subscription_id = subscriptionId;
      }
      for (const name of direction === 'send' ? SEND_STATS : RECV_STATS) {
        const value = statNumber(stat[name]);
        if (value !== null) {
          sample[name] = value;
        }
      }
      if (direction === 'recv') {
        // packetsLost is signed in inbound-rtp (duplicates can make it negative).
        if (typeof stat.packetsLost === 'number') {
          sample.packetsLost = Math.max(0, stat.packetsLost);
        }
        const rtt = pair ? statNumber(pair.stat.currentRoundTripTime) : null;
        if (rtt !== null) {
          sample.roundTripTime = rtt;
        }
      } else {
        const remote = stat.remoteId ? byId.get(stat.remoteId) : null;
        const rtt = statNumber(remote && remote.roundTripTime);
        if (rtt !== null) {
          sample.roundTripTime = rtt;
        }
        if (remote && typeof remote.packetsLost === 'number') {
          sample.packetsLost = Math.max(0, remote.packetsLost);
        }
        const reason = stat.qualityLimitationReason;
        if (['none', 'cpu', 'bandwidth', 'other'].indexOf(reason) >= 0) {
          sample.qualityLimitationReason = reason;
        }
        const available = pair ? statNumber(pair.stat.availableOutgoingBitrate) : null;
        if (available !== null) {
          sample.availableOutgoingBitrate = available;
        }
      }
      if (pair) {
        sample.candidate_pair = pair.json;
      }
      samples.push(sample);
    });
    return samples;
  }

  /** The candidate types a peer connection gathered (local) and received (remote). */
  async function candidateTypes(pc) {
    const local = new Set();
    const remote = new Set();
    try {
      const report = await pc.getStats();
      report.forEach((stat) => {
        if (CANDIDATE_TYPES.indexOf(stat.candidateType) === -1) {
          return;
        }
        if (stat.type === 'local-candidate') {
          local.add(stat.candidateType);
        } else if (stat.type === 'remote-candidate') {
          remote.add(stat.candidateType);
        }
      });
    } catch (err) {
      // A closed peer connection has no stats: report what we have (nothing).
    }
    return { local: Array.from(local).sort(), remote: Array.from(remote).sort() };
  }

  function candidateToJSON(candidate) {
    if (!candidate) {
      return null;
    }
    const init = typeof candidate.toJSON === 'function' ? candidate.toJSON() : candidate;
    return {
      candidate: init.candidate,
      sdpMid: init.sdpMid === undefined ? null : init.sdpMid,
      sdpMLineIndex: init.sdpMLineIndex === undefined ? null : init.sdpMLineIndex,
    };
  }

  /**
   * Put `mimeType` first in a transceiver's codec list and drop other media codecs, since the
   * server relays Opus audio and VP8 or H264 video without transcoding (it prefers VP8 when both
   * are offered). Retransmission (rtx) stays. Browsers without setCodecPreferences, or without
   * the codec, keep their default order.
   */
  function preferCodec(transceiver, kind, mimeType) {
    if (typeof RTCRtpSender === 'undefined' || typeof RTCRtpSender.getCapabilities !== 'function') {
      return false;
    }
    if (typeof transceiver.setCodecPreferences !== 'function') {
      return false;
    }
    const capabilities = RTCRtpSender.getCapabilities(kind);
    if (!capabilities || !capabilities.codecs) {
      return false;
    }
    const wanted = mimeType.toLowerCase();
    const preferred = capabilities.codecs.filter((c) => c.mimeType.toLowerCase() === wanted);
    if (preferred.length === 0) {
      return false;
    }
    const rtx = capabilities.codecs.filter((c) => c.mimeType.toLowerCase() === kind + '/rtx');
    try {
      transceiver.setCodecPreferences(preferred.concat(rtx));
      return true;
    } catch (err) {
      console.warn('OpenConsult: setCodecPreferences(' + mimeType + ') failed, using defaults', err);
      return false;
    }
  }

  /**
   * Trickles one peer connection's local ICE candidates as `ice` messages. Candidates found
   * before the peer id is known (or before the server has the matching SDP) are buffered and
   * flushed by `start(peerId)`. The end of gathering is sent as `candidate: null`.
   */
  class IceTrickler {
    constructor(session, pc) {
      this._session = session;
      this._peerId = null;
      this._buffer = [];
      this._closed = false;
      pc.addEventListener('icecandidate', (event) => {
        // Chrome signals the end of gathering with a null candidate (and sometimes an empty one).
        const candidate = event.candidate && event.candidate.candidate ? event.candidate : null;
        this._push(candidateToJSON(candidate));
      });
    }

    start(peerId) {
      this._peerId = peerId;
      const buffered = this._buffer;
      this._buffer = [];
      for (const candidate of buffered) {
        this._send(candidate);
      }
    }

    close() {
      this._closed = true;
      this._buffer = [];
    }

    _push(candidate) {
      if (this._closed) {
        return;
      }
      if (this._peerId === null) {
        this._buffer.push(candidate);
      } else {
        this._send(candidate);
      }
    }

    _send(candidate) {
      if (this._closed || !this._session._isOpen()) {
        return;
      }
      this._session
        ._request('ice', { peer_id: this._peerId, candidate: candidate })
        .catch((err) => {
          if (this._closed || err.code === 'connection_closed') {
            return;
          }
          this._session._emit('error', err);
        });
    }
  }

  /**
   * One published stream: its own peer connection to the server. After a reconnect (or a failed
   * peer connection) the SDK publishes the same MediaStream again through the same Publisher: its
   * `streamId` and `pc` change and it emits `republished` ({streamId, previousStreamId}); if that
   * fails it emits `ended` ({error}) and is gone.
   */
  class Publisher extends Emitter {
    constructor(session, pc, mediaStream, options) {
      super();
      this.session = session;
      this.pc = pc;
      this.mediaStream = mediaStream;
      this.name = options.name || null;
      this.videoSource = options.videoSource || 'camera';
      /** The video codec offered: 'video/VP8' (default) or 'video/H264'. */
      this.videoCodec = String(options.videoCodec || '').toLowerCase() === 'h264' ||
        String(options.videoCodec || '').toLowerCase() === 'video/h264' ? 'video/H264' : 'video/VP8';
      this.streamId = null;
      this.closed = false;
      this._trickler = null;
      this._restarts = 0;
    }

    /** The raw RTCStatsReport of this stream's peer connection. */
    getStats() {
      return this.pc.getStats();
    }

    /** Stop publishing: tells the server, then closes the peer connection. Tracks are left running. */
    unpublish() {
      return this.session.unpublish(this);
    }

    /** Close the peer connection but keep the publisher (it is published again after a reconnect). */
    _dropPeer() {
      if (this._trickler) {
        this._trickler.close();
        this._trickler = null;
      }
      if (this.pc) {
        try {
          this.pc.close();
        } catch (err) {
          // Already closed: nothing to do.
        }
      }
    }

    _close() {
      if (this.closed) {
        return;
      }
      this.closed = true;
      this.session._livePublishers.delete(this);
      this._dropPeer();
    }
  }

  /** One subscription to a remote stream: its own peer connection from the server. */
  class Subscription extends Emitter {
    constructor(session, subscriptionId, streamId) {
      super();
      this.session = session;
      this.id = subscriptionId;
      this.subscriptionId = subscriptionId;
      this.streamId = streamId;
      this.stream = session.streams.get(streamId) || null;
      this.mediaStream = typeof MediaStream !== 'undefined' ? new MediaStream() : null;
      this.pc = null;
      this.closed = false;
    }

    /** The raw RTCStatsReport of this subscription's peer connection. */
    getStats() {
      if (!this.pc) {
        return Promise.reject(new OpenConsultError('invalid_state', 'Subscription has no peer connection'));
      }
      return this.pc.getStats();
    }

    /** Stop receiving this stream. */
    unsubscribe() {
      return this.session.unsubscribe(this);
    }

    _close(reason) {
      if (this.closed) {
        return;
      }
      this.closed = true;
      if (this._trickler) {
        this._trickler.close();
      }
      if (this.pc) {
        try {
          this.pc.close();
        } catch (err) {
          // Already closed.
        }
      }
      this._emit('ended', { reason: reason || null });
    }
  }

  /**
   * A joined session. Created by `OpenConsult.connect()`; not constructed directly.
   *
   * Properties: `sessionId`, `connectionId`, `room`, `role`, `name`, `state`
   * ('connecting' | 'connected' | 'reconnecting' | 'disconnected'), `streams` (Map of remote
   * streams by id), `connections` (Map of other connections by id), `publishers`, `subscriptions`.
   *
   * When the socket closes without being asked to (network drop, server restart: 1001), the
   * session rejoins by itself with the same token: state `reconnecting`, events `reconnecting`
   * ({attempt, code, reason, delayMs}) before each try, then `reconnected` (the new join data) —
   * or `disconnected` when the time is up or the join is refused. See `connect()` for the options.
   */
  class Session extends Emitter {
    constructor(options) {
      super();
      this.url = options.url || defaultUrl();
      this.state = 'connecting';
      this.sessionId = null;
      this.connectionId = null;
      this.room = null;
      this.role = null;
      this.name = null;
      this.streams = new Map();
      this.connections = new Map();
      this.publishers = new Map();
      this.subscriptions = new Map();
      // The Publisher of this participant's screen share, if any (startScreenShare).
      this.screenShare = null;
      // Set when the server took this connection out of the call (`removedFromCall` data).
      this.removed = null;
      this._requestTimeout = options.requestTimeout === undefined ? 15000 : options.requestTimeout;
      this._mediaConnectTimeout = options.mediaConnectTimeout === undefined ? MEDIA_CONNECT_TIMEOUT_MS
        : options.mediaConnectTimeout;
      this._pingInterval = options.pingInterval === undefined ? 20000 : options.pingInterval;
      // TURN servers come with the join response; 'relay' forces media through them
      // (used to test a deployment's TURN server from a browser).
      this.iceServers = [];
      this._iceTransportPolicy = options.iceTransportPolicy || 'all';
      this._WebSocket = options.WebSocket || (typeof WebSocket !== 'undefined' ? WebSocket : null);
      this._nextId = 1;
      this._pending = new Map();
      this._ws = null;
      this._pingTimer = null;
      this._leaving = false;
      // Rejoining after an unexpected close.
      this._token = options.token;
      this._joinOptions = { room: options.room, userAgent: options.userAgent };
      this._reconnectEnabled = options.reconnect !== false;
      this._reconnectTimeout = options.reconnectTimeout === undefined ? 120000 : options.reconnectTimeout;
      this._reconnectDelay = options.reconnectDelay === undefined ? 500 : options.reconnectDelay;
      this._reconnectMaxDelay = options.reconnectMaxDelay === undefined ? 10000 : options.reconnectMaxDelay;
      this._reconnect = null; // {attempt, since, code, reason, timer, lastError} while reconnecting
      this._heldEvents = null; // events that came on a new socket before its join was answered
      this._pastConnectionIds = new Set(); // this client's earlier connections (before a reconnect)
      this._pastStreamIds = new Set(); // streams this client published before a reconnect
      this._resubscribes = new Map(); // stream id → times its subscription was rebuilt
      this._livePublishers = new Set(); // every Publisher not closed, also while published again
      // Client reports: events and a getStats() summary every `statsInterval` ms (0: none).
      this._reportsEnabled = options.clientReports !== false;
      this._statsInterval = options.statsInterval === undefined ? 5000 : options.statsInterval;
      this._statsTimer = null;
      this._queuedReports = [];
      this._pageListeners = null;
    }

    /**
     * Tell the server something the browser saw (`client.event`, docs/protocol.md): `name` is one
     * of deviceCheck, getUserMediaFailed, iceFailed, connectionFailed, reconnecting, reconnected,
     * pageHidden, pageVisible, tabClosed, precallTest. While the socket is down the report waits (a few at most)
     * and goes out once joined again. Resolves true once stored, false otherwise; never rejects.
     */
    reportEvent(name, data) {
      if (!this._reportsEnabled || this.state === 'disconnected' || CLIENT_EVENT_NAMES.indexOf(name) === -1) {
        return Promise.resolve(false);
      }
      const fields = { event: name };
      if (data && Object.keys(data).length > 0) {
        fields.data = data;
      }
      if (this.state !== 'connected' || !this._isOpen()) {
        this._queuedReports.push(fields);
        this._queuedReports = this._queuedReports.slice(-MAX_QUEUED_REPORTS);
        return Promise.resolve(false);
      }
      return this._request('client.event', fields).then(() => true, () => false);
    }

    /**
     * Report a device check: `camera` / `microphone` each 'ok' | 'denied' | 'not_found' | 'in_use' |
     * 'skipped' | 'error'; `error` the getUserMedia error if there was one (its name is sent, and a
     * getUserMediaFailed event with its message and the `constraints` asked for).
     */
    reportDeviceCheck(camera, microphone, error, constraints) {
      const data = { camera: camera, microphone: microphone };
      if (error) {
        data.error_name = errorName(error);
        const asked = constraints || { audio: true, video: true };
        this.reportEvent('getUserMediaFailed', {
          error_name: data.error_name,
          error_message: reportText(error.message, 300),
          constraints: { audio: Boolean(asked.audio), video: Boolean(asked.video) },
        });
      }
      return this.reportEvent('deviceCheck', data);
    }

    _flushReports() {
      const queued = this._queuedReports;
      this._queuedReports = [];
      for (const fields of queued) {
        this._request('client.event', fields).catch(() => {});
      }
    }

    _startStats() {
      this._stopStats();
      if (this._reportsEnabled && this._statsInterval > 0) {
        this._statsTimer = setInterval(() => this._sendStats(), this._statsInterval);
      }
    }

    _stopStats() {
      if (this._statsTimer) {
        clearInterval(this._statsTimer);
        this._statsTimer = null;
      }
    }

    /** One `client.stats` with a sample per track of every publish and subscription. */
    async _sendStats() {
      if (this.state !== 'connected') {
        return;
      }
      const peers = [];
      for (const publisher of this.publishers.values()) {
        if (publisher.pc && publisher.streamId) {
          peers.push(statsSamples(publisher.pc, publisher.streamId, null, 'send'));
        }
      }
      for (const subscription of this.subscriptions.values()) {
        if (subscription.pc && !subscription.closed) {
          peers.push(statsSamples(subscription.pc, subscription.streamId, subscription.id, 'recv'));
        }
      }
      const samples = [].concat(...(await Promise.all(peers))).slice(0, MAX_STATS_SAMPLES);
      if (samples.length > 0 && this.state === 'connected' && this._isOpen()) {
        this._request('client.stats', { samples: samples }).catch(() => {});
      }
    }

    /** Page hidden / visible as client events; the tab closing as a beacon (the socket may be gone). */
    _watchPage() {
      if (this._pageListeners || !this._reportsEnabled || typeof document === 'undefined'
          || typeof window === 'undefined') {
        return;
      }
      const visibility = () => {
        this.reportEvent(document.visibilityState === 'hidden' ? 'pageHidden' : 'pageVisible');
      };
      const pagehide = () => this._beacon('tabClosed');
      document.addEventListener('visibilitychange', visibility);
      window.addEventListener('pagehide', pagehide);
      this._pageListeners = { visibility: visibility, pagehide: pagehide };
    }

    _unwatchPage() {
      if (this._pageListeners) {
        document.removeEventListener('visibilitychange', this._pageListeners.visibility);
        window.removeEventListener('pagehide', this._pageListeners.pagehide);
        this._pageListeners = null;
      }
    }

    /** `POST /api/client-events` with navigator.sendBeacon (it outlives the page). */
    _beacon(name) {
      if (!this.connectionId || typeof navigator === 'undefined' || typeof navigator.sendBeacon !== 'function') {
        return false;
      }
      const body = JSON.stringify({ token: this._token, connection_id: this.connectionId, event: name });
      try {
        return navigator.sendBeacon(httpUrl(this.url, '/api/client-events'), body);
      } catch (err) {
        return false;
      }
    }

    /**
     * A peer connection failed: which candidate types each side had, as iceFailed / connectionFailed
     * (a timeout is an ICE failure unless ICE got through and DTLS did not).
     */
    async _reportPeerFailure(pc, peerId, reason) {
      const iceState = pc.iceConnectionState;
      const iceFailed = reason === 'timeout' ? iceState !== 'connected' && iceState !== 'completed'
        : iceState === 'failed';
      const types = await candidateTypes(pc);
      const data = {
        local_candidate_types: types.local,
        remote_candidate_types: types.remote,
        ice_servers: Math.min(64, this.iceServers.length),
      };
      if (peerId) {
        data.peer_id = peerId;
      }
      this.reportEvent(iceFailed ? 'iceFailed' : 'connectionFailed', data);
    }

    _rtcConfiguration() {
      return { iceServers: this.iceServers, iceTransportPolicy: this._iceTransportPolicy };
    }

    /** Open the socket and send `join`; resolves with the join response data. */
    _connect() {
      return this._openSocket().then((data) => {
        this._applyJoin(data);
        return data;
      });
    }

    /**
     * Open a socket (it becomes `this._ws`) and send `join` with the session's token. Resolves
     * with the join response data; rejects with an OpenConsultError (`connection_failed`,
     * `connection_closed` with `closeCode`, `timeout`, or the server's code such as `unauthorized`).
     */
    _openSocket() {
      if (!this._WebSocket) {
        return Promise.reject(new OpenConsultError('connection_failed', 'WebSocket is not available'));
      }
      return new Promise((resolve, reject) => {
        let ws;
        try {
          // No subprotocol is offered: JSON is the default, and a browser fails the handshake
          // when it offers one the server does not echo.
          ws = new this._WebSocket(this.url);
        } catch (err) {
          reject(new OpenConsultError('connection_failed', 'Cannot open ' + this.url + ': ' + err.message));
          return;
        }
        this._ws = ws;
        let opened = false;
        let settled = false;
        const fail = (err) => {
          if (!settled) {
            settled = true;
            reject(err);
          }
        };
        ws.onopen = () => {
          if (this._ws !== ws) {
            return;
          }
          opened = true;
          const join = { token: this._token };
          if (this._joinOptions.room) {
            join.room = this._joinOptions.room;
          }
          const userAgent = this._joinOptions.userAgent || (typeof navigator !== 'undefined' && navigator.userAgent);
          if (userAgent) {
            // The schema caps it at 512 characters; the SDK version is appended for support staff.
            join.user_agent = (userAgent + ' OpenConsultJS/' + VERSION).slice(-512);
          }
          join.sdk_version = VERSION;
          this._request('join', join).then((data) => {
            settled = true;
            resolve(data);
          }, fail);
        };
        ws.onmessage = (event) => {
          if (this._ws === ws) {
            this._onMessage(event.data);
          }
        };
        ws.onerror = () => {
          if (!opened) {
            fail(new OpenConsultError('connection_failed', 'Cannot connect to ' + this.url));
          }
        };
        ws.onclose = (event) => {
          if (!opened) {
            fail(new OpenConsultError('connection_failed', 'Cannot connect to ' + this.url, { closeCode: event.code }));
          } else {
            fail(new OpenConsultError('connection_closed', 'Connection closed before the join was answered', {
              closeCode: event.code,
              closeReason: event.reason,
            }));
          }
          this._onSocketClose(ws, event.code, event.reason);
        };
      });
    }

    /** Forget the current socket (its late events are ignored) and close it. */
    _discardSocket(code, reason) {
      const ws = this._ws;
      this._ws = null;
      if (!ws) {
        return;
      }
      ws.onopen = null;
      ws.onmessage = null;
      ws.onerror = null;
      ws.onclose = null;
      if (ws.readyState <= 1) {
        try {
          ws.close(code || 1000, reason || '');
        } catch (err) {
          // Closing a socket that is going away anyway.
        }
      }
    }

    _rejectPending(code, reason) {
      for (const id of Array.from(this._pending.keys())) {
        const entry = this._settle(id);
        entry.reject(
          new OpenConsultError('connection_closed', 'Connection closed before "' + entry.type + '" was answered', {
            closeCode: code,
            closeReason: reason,
          }),
        );
      }
    }

    _stopPing() {
      if (this._pingTimer) {
        clearInterval(this._pingTimer);
        this._pingTimer = null;
      }
    }

    /** The current socket closed (not one this session already let go). */
    _onSocketClose(ws, code, reason) {
      if (ws !== this._ws) {
        return;
      }
      this._rejectPending(code, reason);
      if (this.state === 'reconnecting') {
        this._ws = null; // The reconnect attempt that opened it handles the failure.
        return;
      }
      if (this.state === 'connected' && !this._leaving && this._reconnectEnabled && FINAL_CLOSE_CODES.indexOf(code) === -1) {
        this._startReconnect(code, reason);
        return;
      }
      this._onClose(code, reason);
    }

    /** The connection is gone but the session goes on: drop media, then rejoin with backoff. */
    _startReconnect(code, reason) {
      this.state = 'reconnecting';
      this._stopPing();
      this._discardSocket(4000, 'reconnecting');
      this._rejectPending(code, reason);
      if (this.connectionId) {
        this._pastConnectionIds.add(this.connectionId);
      }
      // Publishers keep their MediaStream and are published again once rejoined.
      for (const publisher of this._livePublishers) {
        if (publisher.streamId) {
          this._pastStreamIds.add(publisher.streamId);
        }
        publisher._dropPeer();
      }
      this.publishers.clear();
      // Subscriptions die with the connection (the server ends them); pages resubscribe when
      // the streams are announced again after the rejoin.
      this._endSubscriptions('networkDisconnected', true);
      this._reconnect = { attempt: 0, since: Date.now(), code: code, reason: reason, timer: null, lastError: null };
      this._scheduleReconnect();
    }

    _scheduleReconnect() {
      const attempt = this._reconnect;
      const elapsed = Date.now() - attempt.since;
      if (elapsed >= this._reconnectTimeout) {
        const last = attempt.lastError;
        this._onClose(attempt.code, attempt.reason, {
          attempts: attempt.attempt,
          error: last ? { code: last.code, message: last.message } : null,
        });
        return;
      }
      attempt.attempt += 1;
      // Exponential backoff with jitter (±25%), capped, never past the deadline.
      const base = Math.min(this._reconnectMaxDelay, this._reconnectDelay * Math.pow(2, attempt.attempt - 1));
      const jittered = Math.round(base * (0.75 + Math.random() * 0.5));
      const delay = Math.max(0, Math.min(jittered, this._reconnectMaxDelay, this._reconnectTimeout - elapsed));
      attempt.timer = setTimeout(() => this._attemptReconnect(attempt), delay);
      this.reportEvent('reconnecting', { attempt: attempt.attempt });
      this._emit('reconnecting', {
        attempt: attempt.attempt,
        code: attempt.code,
        reason: attempt.reason,
        delayMs: delay,
        error: attempt.lastError ? { code: attempt.lastError.code, message: attempt.lastError.message } : null,
      });
    }

    async _attemptReconnect(attempt) {
      if (this._reconnect !== attempt || this.state !== 'reconnecting') {
        return;
      }
      attempt.timer = null;
      this._heldEvents = [];
      // A socket that neither opens nor answers the join in time is given up.
      const limit = this._requestTimeout > 0 ? this._requestTimeout : 15000;
      let timer = null;
      const timeout = new Promise((resolve, reject) => {
        timer = setTimeout(() => reject(new OpenConsultError('timeout', 'No answer to "join" after ' + limit + ' ms')), limit);
      });
      let data;
      try {
        data = await Promise.race([this._openSocket(), timeout]);
      } catch (err) {
        if (this._reconnect !== attempt || this.state !== 'reconnecting') {
          return; // Left meanwhile.
        }
        this._heldEvents = null;
        const error = asError(err);
        this._discardSocket(1000, 'join failed');
        if (RETRYABLE_CODES.indexOf(error.code) === -1 || FINAL_CLOSE_CODES.indexOf(error.closeCode) !== -1) {
          // The server refused the token (expired, revoked, other secret): trying again cannot help.
          this._onClose(error.closeCode || attempt.code, error.message, {
            attempts: attempt.attempt,
            error: { code: error.code, message: error.message },
          });
          return;
        }
        attempt.lastError = error;
        this._scheduleReconnect();
        return;
      } finally {
        clearTimeout(timer);
      }
      if (this._reconnect !== attempt || this.state !== 'reconnecting') {
        return;
      }
      this._rejoined(data, attempt);
    }

    /** Joined again: the new ids, what changed in the room, media back, then the held events. */
    _rejoined(data, attempt) {
      this._reconnect = null;
      const held = this._heldEvents || [];
      this._heldEvents = null;
      const oldStreams = this.streams;
      const oldConnections = this.connections;
      this.streams = new Map();
      this.connections = new Map();
      this._resubscribes.clear();
      this._applyJoin(data);
      for (const [id, connection] of oldConnections) {
        if (!this.connections.has(id)) {
          this._emit('connectionDestroyed', { connection: connection, reason: 'networkDisconnected' });
        }
      }
      for (const [id, connection] of this.connections) {
        if (!oldConnections.has(id)) {
          this._emit('connectionCreated', { connection: connection });
        }
      }
      for (const [id, stream] of oldStreams) {
        if (!this.streams.has(id)) {
          this._emit('streamDestroyed', { stream: stream, reason: 'networkDisconnected' });
        }
      }
      this._emit('reconnected', Object.assign({ attempts: attempt.attempt }, data));
      this.reportEvent('reconnected', { attempt: attempt.attempt });
      // Our streams again, from the same MediaStreams.
      for (const publisher of Array.from(this._livePublishers)) {
        this._republish(publisher, null);
      }
      // Every stream the server lists is announced (again): pages subscribe on streamCreated.
      for (const stream of Array.from(this.streams.values())) {
        if (this.streams.get(stream.stream_id) === stream) {
          this._emit('streamCreated', { stream: stream });
        }
      }
      for (const event of held) {
        this._onEvent(event.name, event.data);
      }
    }

    _isPast(connectionId) {
      return this._pastConnectionIds.has(connectionId);
    }

    _applyJoin(data) {
      this.state = 'connected';
      this.sessionId = data.session_id;
      this.iceServers = Array.isArray(data.ice_servers) ? data.ice_servers : [];
      this.connectionId = data.connection_id;
      this.room = data.room;
      this.role = data.role;
      this.name = data.name;
      // Merge rather than replace: an event may have arrived before the join response.
      for (const connection of data.connections || []) {
        if (connection.connection_id !== this.connectionId && !this._isPast(connection.connection_id)) {
          this.connections.set(connection.connection_id, connection);
        }
      }
      for (const stream of data.streams || []) {
        if (stream.connection_id !== this.connectionId && !this._isPast(stream.connection_id) && !this._isOwnStream(stream.stream_id)) {
          this.streams.set(stream.stream_id, stream);
        }
      }
      this._stopPing();
      if (this._pingInterval > 0) {
        this._pingTimer = setInterval(() => this._keepalive(), this._pingInterval);
      }
      this._flushReports();
      this._startStats();
      this._watchPage();
    }

    /** Ping; a ping left unanswered means the socket is dead without a close (a half-open TCP). */
    _keepalive() {
      const ws = this._ws;
      this._request('ping', {}).catch((err) => {
        if (err.code === 'timeout' && this._ws === ws && this.state === 'connected') {
          this._onSocketClose(ws, 4000, 'ping timeout');
        }
      });
    }

    _isOpen() {
      return Boolean(this._ws) && this._ws.readyState === 1;
    }

    _isOwnStream(streamId) {
      if (this._pastStreamIds.has(streamId)) {
        return true;
      }
      for (const publisher of this.publishers.values()) {
        if (publisher.streamId === streamId) {
          return true;
        }
      }
      return false;
    }

    /**
     * Send a request and resolve with its response `data`, or reject with an
     * OpenConsultError carrying the server's error `code`.
     */
    _request(type, fields) {
      if (!this._isOpen() || (this.state === 'reconnecting' && type !== 'join')) {
        return Promise.reject(new OpenConsultError('connection_closed', 'Not connected (' + type + ')'));
      }
      const id = this._nextId++;
      const message = Object.assign({ type: type, id: id }, fields || {});
      return new Promise((resolve, reject) => {
        const entry = { type: type, resolve: resolve, reject: reject, timer: null };
        if (this._requestTimeout > 0) {
          entry.timer = setTimeout(() => {
            this._pending.delete(id);
            reject(new OpenConsultError('timeout', 'No response to "' + type + '" after ' + this._requestTimeout + ' ms'));
          }, this._requestTimeout);
        }
        this._pending.set(id, entry);
        try {
          this._ws.send(JSON.stringify(message));
        } catch (err) {
          this._settle(id);
          reject(new OpenConsultError('connection_closed', 'Cannot send "' + type + '": ' + err.message));
        }
      });
    }

    /** Remove a pending request and stop its timer; returns the entry or undefined. */
    _settle(id) {
      const entry = this._pending.get(id);
      if (entry) {
        this._pending.delete(id);
        if (entry.timer) {
          clearTimeout(entry.timer);
        }
      }
      return entry;
    }

    _onMessage(raw) {
      if (typeof raw !== 'string') {
        console.warn('OpenConsult: ignoring a binary frame (this SDK speaks JSON)');
        return;
      }
      let message;
      try {
        message = JSON.parse(raw);
      } catch (err) {
        console.warn('OpenConsult: ignoring a frame that is not JSON', raw);
        return;
      }
      if (!message || typeof message !== 'object') {
        return;
      }
      if (message.type === 'response') {
        this._onResponse(message);
      } else if (message.type === 'event') {
        this._onEvent(message.event, message.data || {});
      }
    }

    _onResponse(message) {
      if (message.id === null || message.id === undefined) {
        // The server could not read a request id: report it, nothing to settle.
        const error = message.error || {};
        this._emit('error', new OpenConsultError(error.code || 'invalid_message', error.message));
        return;
      }
      const entry = this._settle(message.id);
      if (!entry) {
        return; // A late response to a request that timed out.
      }
      if (message.ok) {
        entry.resolve(message.data || {});
      } else {
        const error = message.error || {};
        entry.reject(
          new OpenConsultError(error.code || 'internal_error', error.message || entry.type + ' failed', {
            request: entry.type,
          }),
        );
      }
    }

    _onEvent(name, data) {
      if (this._heldEvents && this.state === 'reconnecting') {
        // A new socket's events before its join is answered: applied after the rejoin.
        this._heldEvents.push({ name: name, data: data });
        return;
      }
      switch (name) {
        case 'connectionCreated': {
          const connection = data.connection;
          if (!connection || connection.connection_id === this.connectionId || this._isPast(connection.connection_id)) {
            return;
          }
          this.connections.set(connection.connection_id, connection);
          this._emit(name, data);
          return;
        }
        case 'connectionDestroyed': {
          const connection = data.connection;
          if (!connection || !this.connections.has(connection.connection_id)) {
            return;
          }
          this.connections.delete(connection.connection_id);
          this._emit(name, data);
          return;
        }
        case 'streamCreated': {
          const stream = data.stream;
          if (!stream || !stream.stream_id || this._isOwnStream(stream.stream_id) || this._isPast(stream.connection_id)) {
            return;
          }
          if (this.streams.has(stream.stream_id)) {
            return; // Already known from the join response.
          }
          this.streams.set(stream.stream_id, stream);
          this._emit(name, data);
          return;
        }
        case 'streamDestroyed': {
          const stream = data.stream;
          if (!stream || !this.streams.has(stream.stream_id)) {
            return;
          }
          this.streams.delete(stream.stream_id);
          this._emit(name, data);
          return;
        }
        case 'subscriptionEnded': {
          const subscription = this.subscriptions.get(data.subscription_id);
          if (!subscription) {
            return;
          }
          if (data.reason === 'networkDisconnected' && subscription.pc && this.streams.has(subscription.streamId) &&
              subscription.pc.connectionState !== 'connected') {
            // The server's connect deadline (media.connect_timeout_s) came before ours: the same failure.
            this._restartSubscription(subscription, 'timeout');
            return;
          }
          this.subscriptions.delete(subscription.id);
          subscription._close(data.reason);
          this._emit(name, Object.assign({ subscription: subscription }, data));
          return;
        }
        case 'removedFromCall': {
          // The server took this connection out of the call (a removed guest); the socket closes
          // next with a final code, so the session does not rejoin.
          this.removed = data;
          this._emit(name, data);
          return;
        }
        default:
          if (WORKFLOW_EVENTS.indexOf(name) !== -1) {
            this._emit(name, data);
          }
          // Unknown events come from a newer server: ignore them.
          return;
      }
    }

    /** The end of the session: state `disconnected`, media closed, `disconnected` emitted once. */
    _onClose(code, reason, details) {
      if (this.state === 'disconnected') {
        return;
      }
      const wasJoined = this.state === 'connected' || this.state === 'reconnecting';
      this.state = 'disconnected';
      this._stopPing();
      this._stopStats();
      this._unwatchPage();
      this._queuedReports = [];
      if (this._reconnect) {
        clearTimeout(this._reconnect.timer);
        this._reconnect = null;
      }
      this._heldEvents = null;
      this._discardSocket(1000, this._leaving ? 'leave' : 'closed');
      this._rejectPending(code, reason);
      this._closeMedia('networkDisconnected');
      if (wasJoined) {
        this._emit('disconnected', Object.assign({ code: code, reason: reason, left: this._leaving }, details || {}));
      }
    }

    /**
     * End every subscription locally (their peer connections are gone with the connection):
     * each emits `ended`; with `announce`, the session emits `subscriptionEnded` for it too.
     */
    _endSubscriptions(reason, announce) {
      const subscriptions = Array.from(this.subscriptions.values());
      this.subscriptions.clear();
      for (const subscription of subscriptions) {
        subscription._close(reason);
        if (announce) {
          this._emit('subscriptionEnded', {
            subscription_id: subscription.id,
            stream_id: subscription.streamId,
            reason: reason,
            subscription: subscription,
          });
        }
      }
    }

    _closeMedia(reason) {
      for (const publisher of Array.from(this._livePublishers)) {
        publisher._close();
      }
      this.publishers.clear();
      this._endSubscriptions(reason, false);
    }

    /**
     * Call `onFailed(reason)` once when the peer connection's transport fails for good ('failed': e.g.
     * ICE after a network change) or is not connected within `mediaConnectTimeout` ('timeout': e.g. no
     * candidate pair works, which browsers may not call a failure for minutes). Emits `mediaConnected`.
     */
    _watchPeer(pc, onFailed, peerId) {
      let failed = false;
      let deadline = null;
      const fail = (reason) => {
        clearTimeout(deadline);
        if (failed) {
          return;
        }
        failed = true;
        this._reportPeerFailure(pc, peerId(), reason);
        if (this.state === 'connected') {
          onFailed(reason);
        }
      };
      if (this._mediaConnectTimeout > 0) {
        deadline = setTimeout(() => {
          // Closed by the SDK meanwhile (close() fires no event): nothing to report.
          if (pc.signalingState !== 'closed' && pc.connectionState !== 'connected') {
            fail('timeout');
          }
        }, this._mediaConnectTimeout);
      }
      pc.addEventListener('connectionstatechange', () => {
        if (pc.connectionState === 'connected') {
          clearTimeout(deadline);
          this._emit('mediaConnected', { peerId: peerId() });
        } else if (pc.connectionState === 'failed') {
          fail('failed');
        } else if (pc.connectionState === 'closed') {
          clearTimeout(deadline);
        }
      });
    }

    /** The error of a failed media connection: `media_timeout` (not up in time) or `media_error`. */
    _mediaError(kind, reason, streamId) {
      const seconds = Math.round(this._mediaConnectTimeout / 1000);
      const what = kind === 'publish' ? 'Sending stream ' : 'Receiving stream ';
      return reason === 'timeout'
        ? new OpenConsultError('media_timeout', what + streamId + ' was not connected within ' + seconds + ' s')
        : new OpenConsultError('media_error', what + streamId + ': its connection failed');
    }

    /** Tell listeners a stream's media connection failed (`mediaFailed`). */
    _mediaFailed(kind, reason, streamId, peerId, attempt, retrying, error) {
      this._emit('mediaFailed', {
        kind: kind,
        reason: reason,
        streamId: streamId,
        peerId: peerId,
        attempt: attempt,
        maxAttempts: MAX_MEDIA_RESTARTS + 1,
        retrying: retrying,
        timeoutMs: this._mediaConnectTimeout,
        error: error,
      });
    }

    /**
     * Publish a MediaStream as one stream. Options: `name`, `videoSource` ('camera' | 'screen'),
     * `videoCodec` ('VP8', the default, or 'H264': the only video codec offered; subscribers
     * that cannot receive it get `codec_not_supported` when they answer).
     * Resolves with a Publisher (`.streamId`, `.pc`, `.getStats()`, `.unpublish()`); the SDK
     * publishes it again by itself after a reconnect or a failed peer connection.
     */
    async publish(mediaStream, options) {
      options = options || {};
      if (this.state !== 'connected') {
        throw new OpenConsultError('invalid_state', 'Cannot publish in state "' + this.state + '"');
      }
      const tracks = mediaStream ? mediaStream.getTracks() : [];
      if (tracks.length === 0) {
        throw new OpenConsultError('invalid_argument', 'Cannot publish a MediaStream without tracks');
      }
      const publisher = new Publisher(this, null, mediaStream, options);
      this._livePublishers.add(publisher);
      try {
        await this._negotiatePublish(publisher);
        return publisher;
      } catch (err) {
        this._abandonPublisher(publisher);
        throw asError(err);
      }
    }

    /** A new peer connection for `publisher` and a `publish` for it; sets its streamId and pc. */
    async _negotiatePublish(publisher) {
      const tracks = publisher.mediaStream.getTracks().filter((track) => track.readyState !== 'ended');
      if (tracks.length === 0) {
        throw new OpenConsultError('invalid_argument', 'Cannot publish a MediaStream without live tracks');
      }
      const pc = new RTCPeerConnection(this._rtcConfiguration());
      publisher.pc = pc;
      publisher.streamId = null;
      publisher._trickler = new IceTrickler(this, pc);
      this._watchPeer(pc, (reason) => {
        if (publisher.pc === pc && !publisher.closed) {
          this._restartPublisher(publisher, reason);
        }
      }, () => publisher.streamId);
      for (const track of tracks) {
        const transceiver = pc.addTransceiver(track, { direction: 'sendonly', streams: [publisher.mediaStream] });
        if (track.kind === 'video') {
          preferCodec(transceiver, 'video', publisher.videoCodec);
        } else if (track.kind === 'audio') {
          preferCodec(transceiver, 'audio', 'audio/opus');
        }
      }
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      const request = { offer: { type: 'offer', sdp: offer.sdp }, video_source: publisher.videoSource };
      if (publisher.name) {
        request.name = String(publisher.name).slice(0, 80); // the schema's limit
      }
      const data = await this._request('publish', request);
      if (publisher.closed || publisher.pc !== pc) {
        // Unpublished (or lost) while it was being set up: the server's new stream goes too.
        this._request('unpublish', { stream_id: data.stream_id }).catch(() => {});
        throw new OpenConsultError('invalid_state', 'Unpublished while it was being set up');
      }
      publisher.streamId = data.stream_id;
      this.publishers.set(data.stream_id, publisher);
      await pc.setRemoteDescription(data.answer);
      // The server now knows this peer and has its offer: send what was gathered so far.
      publisher._trickler.start(data.stream_id);
    }

    /** A publish that failed: close it and tell the server if it got that far. */
    _abandonPublisher(publisher) {
      publisher._close();
      if (publisher.streamId) {
        if (this.publishers.get(publisher.streamId) === publisher) {
          this.publishers.delete(publisher.streamId);
        }
        this._request('unpublish', { stream_id: publisher.streamId }).catch(() => {});
      }
    }

    /** Publish `publisher`'s MediaStream again (after a reconnect, or its peer connection failed). */
    async _republish(publisher, previousStreamId) {
      const previous = previousStreamId || publisher.streamId;
      try {
        await this._negotiatePublish(publisher);
        publisher._emit('republished', { streamId: publisher.streamId, previousStreamId: previous });
      } catch (err) {
        if (this.state !== 'connected' || publisher.closed) {
          // Lost the connection again (the next rejoin publishes it) or unpublished meanwhile.
          publisher._dropPeer();
          return;
        }
        const error = asError(err);
        this._abandonPublisher(publisher);
        publisher._emit('ended', { error: error });
        this._emit('error', error);
      }
    }

    /**
     * The publisher's peer connection failed or timed out: unpublish it and publish the same stream
     * again; after MAX_MEDIA_RESTARTS tries it ends (`ended` with the error).
     */
    _restartPublisher(publisher, reason) {
      const retrying = publisher._restarts < MAX_MEDIA_RESTARTS;
      const streamId = publisher.streamId;
      const error = this._mediaError('publish', reason || 'failed', streamId);
      if (!retrying) {
        this._abandonPublisher(publisher);
        publisher._emit('ended', { error: error });
        this._emit('error', new OpenConsultError(error.code, error.message + '; gave up after ' +
          (MAX_MEDIA_RESTARTS + 1) + ' attempts'));
      }
      this._mediaFailed('publish', reason || 'failed', streamId, streamId, publisher._restarts + 1, retrying, error);
      if (!retrying) {
        return;
      }
      const pc = publisher.pc;
      publisher._dropPeer();
      // Tried again after a pause (a connection that fails at once must not burn every attempt in a
      // moment); the server's own deadline usually reaps the old stream meanwhile, with its report.
      setTimeout(() => {
        if (publisher.closed || publisher.pc !== pc || this.state !== 'connected') {
          return; // Unpublished, or already published again by a rejoin.
        }
        publisher._restarts += 1;
        const previous = publisher.streamId;
        if (previous) {
          this.publishers.delete(previous);
          this._request('unpublish', { stream_id: previous }).catch(() => {});
        }
        this._republish(publisher, previous);
      }, mediaRetryDelay(publisher._restarts + 1));
    }

    /** Stop a stream published by this session (a Publisher or its stream id). */
    async unpublish(publisherOrStreamId) {
      const streamId = typeof publisherOrStreamId === 'string' ? publisherOrStreamId : publisherOrStreamId.streamId;
      const publisher = typeof publisherOrStreamId === 'string' ? this.publishers.get(streamId) : publisherOrStreamId;
      if (publisher) {
        if (this.publishers.get(streamId) === publisher) {
          this.publishers.delete(streamId);
        }
        publisher._close();
      }
      if (!streamId) {
        return; // Being published again: closing it is all there is to do.
      }
      await this._request('unpublish', { stream_id: streamId });
    }

    /**
     * Receive a remote stream. Resolves with a Subscription (`.mediaStream`, `.pc`,
     * `.getStats()`, `.unsubscribe()`, `.on('ended', cb)`). If its peer connection fails, the SDK
     * ends it (`subscriptionEnded`, reason `networkDisconnected`) and announces the stream again
     * with `streamCreated` so the page subscribes anew (a few times at most).
     */
    async subscribe(streamId) {
      if (this.state !== 'connected') {
        throw new OpenConsultError('invalid_state', 'Cannot subscribe in state "' + this.state + '"');
      }
      const data = await this._request('subscribe', { stream_id: streamId });
      const subscription = new Subscription(this, data.subscription_id, streamId);
      // Registered before any await so a subscriptionEnded event finds it.
      this.subscriptions.set(subscription.id, subscription);
      const pc = new RTCPeerConnection(this._rtcConfiguration());
      subscription.pc = pc;
      subscription._trickler = new IceTrickler(this, pc);
      pc.addEventListener('track', (event) => {
        if (subscription.mediaStream && !subscription.mediaStream.getTrackById(event.track.id)) {
          subscription.mediaStream.addTrack(event.track);
        }
        subscription._emit('track', event.track);
      });
      this._watchPeer(pc, (reason) => this._restartSubscription(subscription, reason), () => subscription.id);
      try {
        await pc.setRemoteDescription(data.offer);
        const answer = await pc.createAnswer();
        await pc.setLocalDescription(answer);
        if (subscription.closed) {
          throw new OpenConsultError('invalid_state', 'Subscription ended while it was being set up');
        }
        await this._request('answer', {
          subscription_id: subscription.id,
          answer: { type: 'answer', sdp: answer.sdp },
        });
        // Trickle only once the server has applied our answer.
        subscription._trickler.start(subscription.id);
        return subscription;
      } catch (err) {
        this.subscriptions.delete(subscription.id);
        subscription._close('mediaStopped');
        if (this._isOpen()) {
          this._request('unsubscribe', { subscription_id: subscription.id }).catch(() => {});
        }
        throw asError(err);
      }
    }

    /**
     * A subscription's peer connection failed or timed out: unsubscribe, then announce the stream
     * again (the page subscribes anew); after MAX_MEDIA_RESTARTS tries it just ends.
     */
    _restartSubscription(subscription, reason) {
      if (subscription.closed || this.subscriptions.get(subscription.id) !== subscription) {
        return;
      }
      const streamId = subscription.streamId;
      const restarts = this._resubscribes.get(streamId) || 0;
      const retrying = restarts < MAX_MEDIA_RESTARTS;
      const error = this._mediaError('subscribe', reason || 'failed', streamId);
      this._mediaFailed('subscribe', reason || 'failed', streamId, subscription.id, restarts + 1, retrying, error);
      if (retrying) {
        this._resubscribes.set(streamId, restarts + 1);
      } else {
        this._emit('error', new OpenConsultError(error.code, error.message + '; gave up after ' +
          (MAX_MEDIA_RESTARTS + 1) + ' attempts'));
      }
      this.subscriptions.delete(subscription.id);
      this._request('unsubscribe', { subscription_id: subscription.id }).catch(() => {});
      subscription._close('networkDisconnected');
      this._emit('subscriptionEnded', {
        subscription_id: subscription.id,
        stream_id: streamId,
        reason: 'networkDisconnected',
        subscription: subscription,
      });
      if (retrying) {
        // Announced again after a pause: the page subscribes anew.
        setTimeout(() => {
          const stream = this.streams.get(streamId);
          if (stream && this.state === 'connected') {
            this._emit('streamCreated', { stream: stream });
          }
        }, mediaRetryDelay(restarts + 1));
      }
    }

    /** Stop a subscription (a Subscription or its id). */
    async unsubscribe(subscriptionOrId) {
      const id = typeof subscriptionOrId === 'string' ? subscriptionOrId : subscriptionOrId.id;
      const subscription = this.subscriptions.get(id);
      if (subscription) {
        this.subscriptions.delete(id);
        subscription._close('clientDisconnected');
      }
      await this._request('unsubscribe', { subscription_id: id });
    }

    /**
     * Send any protocol request (e.g. `session.request('chat.send', {channel_id, text})`) and
     * resolve with its response `data`; rejects with an OpenConsultError carrying the server's
     * error `code` (`forbidden`, `invalid_state`, …). The helpers below are thin wrappers.
     */
    request(type, fields) {
      if (typeof type !== 'string' || !type) {
        return Promise.reject(new OpenConsultError('invalid_argument', 'request type must be a non-empty string'));
      }
      if (type === 'join') {
        return Promise.reject(new OpenConsultError('invalid_argument', 'join is sent by OpenConsult.connect()'));
      }
      return this._request(type, fields || {});
    }

    // ---- workflow: waiting room, queue, consultation, chat, announcements ----

    /** Patient with a consultation link: get ready and take a place in line (`waiting_room.enter`). */
    enterWaitingRoom(options) {
      const fields = {};
      if (options && options.deviceCheckPassed !== undefined) {
        fields.device_check_passed = Boolean(options.deviceCheckPassed);
      }
      if (options && options.devices) {
        // What the device check found ({camera, microphone}): shown in the clinician's queue.
        fields.devices = { camera: options.devices.camera, microphone: options.devices.microphone };
      }
      return this._request('waiting_room.enter', fields);
    }

    /** Patient: give up the place in line (`waiting_room.leave`). */
    leaveWaitingRoom() {
      return this._request('waiting_room.leave', {});
    }

    /** Staff: the room's queue now, then `queueUpdated` events (`queue.watch`). */
    watchQueue(roomId) {
      return this._request('queue.watch', { room_id: roomId });
    }

    /** Staff: stop `queueUpdated` events for a room (`queue.unwatch`). */
    unwatchQueue(roomId) {
      return this._request('queue.unwatch', { room_id: roomId });
    }

    /**
     * A consultation's record `{consultation}` (state, appointment, times): without an id, the one
     * this session's token names (a patient may read only that one).
     */
    getConsultation(sessionId) {
      return this._request('consultation.get', sessionId ? { session_id: sessionId } : {});
    }

    /** Clinician: admit a waiting patient; resolves with `{consultation, room, token}`. */
    admit(sessionId) {
      return this._request('consultation.admit', { session_id: sessionId });
    }

    /** Staff: move a waiting patient to another waiting room (same session id, new segment). */
    transfer(sessionId, toRoomId) {
      return this._request('consultation.transfer', { session_id: sessionId, to_room_id: toRoomId });
    }

    /** Clinician: end the video consultation (`consultation.end`). */
    endConsultation(sessionId) {
      return this._request('consultation.end', { session_id: sessionId });
    }

    /** Clinician: consultation completed, waiting for the journal note (`consultation.complete`). */
    complete(sessionId) {
      return this._request('consultation.complete', { session_id: sessionId });
    }

    /** Clinician: continue (or hold) the consultation by phone instead (`consultation.phone_fallback`). */
    phoneFallback(sessionId) {
      return this._request('consultation.phone_fallback', { session_id: sessionId });
    }

    /** Send a chat message; the text is delivered verbatim (show it with textContent). */
    sendChat(channelId, text) {
      return this._request('chat.send', { channel_id: channelId, text: text });
    }

    /** A chat channel's messages, oldest first: `{channel_id, messages}`. */
    chatHistory(channelId) {
      return this._request('chat.history', { channel_id: channelId });
    }

    /** Staff: post a service announcement to a waiting room. Options: `expiresInS` (default 3600). */
    postAnnouncement(roomId, text, options) {
      const fields = { room_id: roomId, text: text };
      if (options && options.expiresInS !== undefined) {
        fields.expires_in_s = options.expiresInS;
      }
      return this._request('announcement.post', fields);
    }

    /**
     * Share the screen (or a window or tab) as a second stream of this participant, with
     * `video_source` `screen`: the others show it large. Asks the browser with getDisplayMedia
     * (`options.displayMedia` overrides its constraints; default video only) unless
     * `options.mediaStream` is given. Resolves with the Publisher (`session.screenShare`); one
     * share at a time (`invalid_state` otherwise). When the share stops — `stopScreenShare()`, or
     * the browser's own "Stop sharing" — it is unpublished and `screenShareEnded` is emitted.
     */
    async startScreenShare(options) {
      options = options || {};
      if (this.screenShare) {
        throw new OpenConsultError('invalid_state', 'The screen is shared already; stop that share first');
      }
      let stream = options.mediaStream;
      if (!stream) {
        const devices = typeof navigator !== 'undefined' ? navigator.mediaDevices : null;
        if (!devices || typeof devices.getDisplayMedia !== 'function') {
          throw new OpenConsultError('not_supported', 'This browser cannot share its screen (no getDisplayMedia)');
        }
        try {
          stream = await devices.getDisplayMedia(options.displayMedia || { video: true, audio: false });
        } catch (err) {
          throw new OpenConsultError('media_error', 'Screen sharing was not started: ' + ((err && err.message) || err),
            { cause: err });
        }
      }
      const pending = { stream: stream };
      this.screenShare = pending;
      let publisher;
      try {
        publisher = await this.publish(stream, { name: options.name || (this.name ? this.name + ' (screen)' : 'Screen'),
          videoSource: 'screen' });
      } catch (err) {
        this.screenShare = null;
        if (!options.mediaStream) {
          stream.getTracks().forEach((track) => track.stop());
        }
        throw err;
      }
      if (this.screenShare !== pending) {
        // Stopped while it was being set up.
        this.unpublish(publisher).catch(() => {});
        throw new OpenConsultError('invalid_state', 'Screen sharing was stopped while it was being set up');
      }
      this.screenShare = publisher;
      for (const track of stream.getVideoTracks()) {
        track.addEventListener('ended', () => {
          if (this.screenShare === publisher) {
            this.stopScreenShare().catch(() => {});
          }
        });
      }
      return publisher;
    }

    /** Stop sharing the screen (unpublish it and stop its tracks); `screenShareEnded` follows. Idempotent. */
    async stopScreenShare() {
      const share = this.screenShare;
      if (!share) {
        return;
      }
      this.screenShare = null;
      const stream = share.mediaStream || share.stream;
      if (stream) {
        stream.getTracks().forEach((track) => track.stop());
      }
      const streamId = share.streamId || null;
      try {
        if (share.streamId !== undefined && this.state === 'connected') {
          await this.unpublish(share);
        } else if (typeof share._close === 'function') {
          share._close();
        }
      } finally {
        this._emit('screenShareEnded', { streamId: streamId });
      }
    }

    /**
     * Clinician: add a guest (a relative, an interpreter) to the consultation
     * (`consultation.invite_guest`). Resolves with `{consultation, guest, guest_token, guest_link,
     * valid_from_ms, valid_until_ms}`; `guest_link` is relative (`/#token=…`) unless the server has
     * a `workflow.public_url`.
     */
    inviteGuest(sessionId, name) {
      return this._request('consultation.invite_guest', { session_id: sessionId, name: name });
    }

    /** Clinician: revoke a guest's link and take them out of the call (`consultation.remove_guest`). */
    removeGuest(sessionId, guestId) {
      return this._request('consultation.remove_guest', { session_id: sessionId, guest_id: guestId });
    }

    /** Round trip to the server; resolves with its clock (`{time}`, ms). */
    ping() {
      return this._request('ping', {});
    }

    /**
     * Leave the session: say so, close every peer connection and the socket. Idempotent; also
     * stops a reconnect in progress. Emits `disconnected` with `left: true`.
     */
    async leave() {
      if (this.state === 'disconnected') {
        return;
      }
      this._leaving = true;
      if (this.state === 'connected') {
        try {
          await this._request('leave', {});
        } catch (err) {
          // Leaving anyway: the socket is closed below.
        }
      }
      this._closeMedia('clientDisconnected');
      this._onClose(1000, 'leave');
    }
  }

  function asError(err) {
    if (err instanceof OpenConsultError) {
      return err;
    }
    // WebRTC failures (bad SDP, closed peer connection) surface as DOMExceptions.
    return new OpenConsultError('media_error', (err && err.message) || String(err), { cause: err });
  }

  /**
   * A `mediaFailed` event in plain words for the person at the screen: what failed, whether it is
   * being tried again, and what to try if it keeps happening.
   */
  function mediaFailureText(event) {
    const seconds = Math.round((event.timeoutMs || MEDIA_CONNECT_TIMEOUT_MS) / 1000);
    let text = event.kind === 'publish'
      ? 'Your camera and microphone could not connect to the server'
      : 'The video from another participant could not connect to you';
    text += event.reason === 'timeout' ? ' within ' + seconds + ' seconds.' : ': the connection failed.';
    text += event.retrying
      ? ' Trying again (attempt ' + (event.attempt + 1) + ' of ' + event.maxAttempts + ')…'
      : ' Gave up after ' + event.maxAttempts + ' attempts.';
    return text + ' If this keeps happening, try another network (for example mobile data instead of Wi-Fi) or ' +
      'a wired connection, or ask your IT department to allow UDP traffic (or TURN on port 443) to this server.';
  }

  /**
   * Connect and join. Options: `token` (required JWT), `url` (default `ws(s)://<this host>/ws`),
   * `room` (optional check against the token), `requestTimeout` (ms, default 15000; 0 = none),
   * `pingInterval` (ms, default 20000; 0 = no keepalive), `userAgent` (default navigator.userAgent),
   * `iceTransportPolicy` ('all' | 'relay'), `reconnect` (default true: rejoin after an unexpected
   * close), `reconnectTimeout` (ms of retrying before giving up, default 120000),
   * `reconnectDelay` (first backoff, ms, default 500; doubles each try, ±25% jitter) and
   * `reconnectMaxDelay` (ms, default 10000), `mediaConnectTimeout` (ms a peer connection has to connect
   * before it counts as failed, default 15000; 0 = none). Only a joined session reconnects: a refused join
   * (close 4001, or any join error from the server but `internal_error`/`rate_limited`) does not.
   * Resolves with a joined Session; rejects with an OpenConsultError (`.code` e.g. `unauthorized`, `token_expired`).
   */
  async function connect(options) {
    options = options || {};
    if (!options.token) {
      throw new OpenConsultError('unauthorized', 'A token is required');
    }
    const session = new Session(options);
    try {
      await session._connect();
    } catch (err) {
      session._leaving = true;
      session._onClose(1000, 'join failed');
      throw asError(err);
    }
    return session;
  }

  /**
   * A patient arrives with a shared walk-in link: `POST /api/walk-in` with the link's token as
   * Bearer and `{name}`. Options: `token` (the walk-in link's token, required), `name` (optional),
   * `baseUrl` (default: this page's origin). Resolves with the server's answer
   * `{consultation, queue_entry, position, patient_token, patient_link}`; rejects with an
   * OpenConsultError carrying the server's code (`rate_limited` with `retryAfterS`, `token_expired`,
   * `forbidden`, …) or `connection_failed`.
   */
  async function walkIn(options) {
    options = options || {};
    if (!options.token) {
      throw new OpenConsultError('unauthorized', 'A walk-in link token is required');
    }
    const body = {};
    if (typeof options.name === 'string' && options.name.trim()) {
      body.name = options.name.trim();
    }
    let response;
    try {
      response = await fetch((options.baseUrl || '') + '/api/walk-in', {
        method: 'POST',
        headers: { Authorization: 'Bearer ' + options.token, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
    } catch (err) {
      throw new OpenConsultError('connection_failed', 'Cannot reach the server', { cause: err });
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      const details = { status: response.status };
      const retry = Number(response.headers.get('Retry-After'));
      if (retry > 0) {
        details.retryAfterS = retry;
      }
      throw new OpenConsultError(error.code || 'http_' + response.status, error.message || 'HTTP ' + response.status, details);
    }
    return data;
  }

  /** The link parameters that hold a token: kept in the URL fragment, which never reaches a server. */
  const LINK_TOKEN_PARAMS = ['token', 'walk_in'];

  /**
   * A page's parameters: the query string plus the URL fragment (`/#token=…`, `/#walk_in=…`),
   * the fragment winning. A token still in the query of an old link (`/?token=…`) is moved into
   * the fragment with history.replaceState, so it leaves the address bar's query (and so the
   * next request's logs and Referer). Returns a URLSearchParams.
   */
  function pageParams() {
    const params = new URLSearchParams(location.search);
    const fragment = new URLSearchParams(location.hash.replace(/^#/, ''));
    fragment.forEach((value, key) => params.set(key, value));
    const query = new URLSearchParams(location.search);
    let moved = false;
    for (const key of LINK_TOKEN_PARAMS) {
      if (query.has(key)) {
        if (!fragment.has(key)) {
          fragment.set(key, query.get(key));
        }
        query.delete(key);
        moved = true;
      }
    }
    if (moved && typeof history !== 'undefined' && history.replaceState) {
      const rest = query.toString();
      history.replaceState(history.state, '', location.pathname + (rest ? '?' + rest : '') + '#' + fragment.toString());
    }
    return params;
  }

  /**
   * The claims of a JWT, decoded but NOT verified (the server verifies at `join`): for a page to
   * decide what to show, e.g. a patient's waiting room for a consultation link. Null if unreadable.
   */
  function decodeToken(token) {
    if (typeof token !== 'string') {
      return null;
    }
    const parts = token.split('.');
    if (parts.length !== 3) {
      return null;
    }
    try {
      let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
      while (b64.length % 4) {
        b64 += '=';
      }
      const binary = atob(b64);
      const bytes = new Uint8Array(binary.length);
      for (let i = 0; i < binary.length; i++) {
        bytes[i] = binary.charCodeAt(i);
      }
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      return claims && typeof claims === 'object' && !Array.isArray(claims) ? claims : null;
    } catch (err) {
      return null;
    }
  }

  /**
   * Inbound video figures per subscription (a Map of stream id → Subscription), from
   * getStats(): what support asks a caller for, and what the browser tests check.
   */
  async function inboundVideoStats(subscriptions) {
    const result = [];
    for (const [streamId, subscription] of subscriptions) {
      if (!subscription || !subscription.pc) {
        continue;
      }
      const entry = {
        subscriptionId: subscription.id,
        streamId: streamId,
        framesDecoded: 0,
        bytesReceived: 0,
        frameWidth: null,
        frameHeight: null,
        connectionState: subscription.pc.connectionState,
      };
      const report = await subscription.getStats();
      report.forEach((stat) => {
        if (stat.type === 'inbound-rtp' && (stat.kind || stat.mediaType) === 'video') {
          entry.framesDecoded += stat.framesDecoded || 0;
          entry.bytesReceived += stat.bytesReceived || 0;
          entry.frameWidth = stat.frameWidth || entry.frameWidth;
          entry.frameHeight = stat.frameHeight || entry.frameHeight;
        }
      });
      result.push(entry);
    }
    return result;
  }

  // ---- pre-call test (docs/operations.md, "Pre-call test") ----

  /**
   * The verdict's rules, all in one place: a measure past `poor` makes the verdict poor, past
   * `fair` fair; no media through the server within the deadline is `cannot_connect`. Loss and
   * jitter in %, ms; round trip in ms; bitrates in kbit/s (the video rules only when video was sent).
   */
  const PRECALL_LIMITS = Object.freeze({
    poor: Object.freeze({ lossPct: 8, rttMs: 500, jitterMs: 60, videoKbps: 80, audioKbps: 12 }),
    fair: Object.freeze({ lossPct: 2, rttMs: 250, jitterMs: 30, videoKbps: 150, audioKbps: 20 }),
  });

  const PRECALL_ADVICE = {
    cannot_connect: 'Your device could not reach the clinic\'s video server. Try another network (for example your ' +
      'phone\'s mobile data) or turn off a VPN. On a work or hospital network, ask IT to allow UDP (and TCP port ' +
      '443) to the video server.',
    loss: 'Your connection loses data. Use a wired connection or move closer to the Wi-Fi router, and pause ' +
      'downloads or other video on the same network.',
    rtt: 'Your connection is slow to answer. Use a wired connection or another network; a VPN can also slow it down.',
    bitrate: 'Your connection is too slow for a clear picture. Use a wired connection or another network; the ' +
      'consultation can also go ahead with sound only.',
    tcp: 'Your network only lets the call through over TCP, which stutters more. Ask IT to open UDP to the video server.',
    good: 'Your connection is good for a video consultation.',
  };

  /**
   * The pre-call test's verdict from its figures — a pure function: `{verdict: 'good' | 'fair' |
   * 'poor' | 'cannot_connect', reasons: ['loss', …], title, advice}`. `figures` is what
   * `runPrecallTest` measured: `connected`, `up_kbps`, `down_kbps`, `up_loss_pct`, `down_loss_pct`,
   * `rtt_ms`, `jitter_ms`, `video`, `protocol`.
   */
  function precallVerdict(figures) {
    const f = figures || {};
    if (!f.connected || !(f.down_kbps > 0)) {
      return { verdict: 'cannot_connect', reasons: ['connect'], title: 'Cannot connect', advice: PRECALL_ADVICE.cannot_connect };
    }
    const loss = Math.max(f.up_loss_pct || 0, f.down_loss_pct || 0);
    const rate = Math.min(f.up_kbps || 0, f.down_kbps || 0);
    const past = (limits) => {
      const reasons = [];
      if (loss > limits.lossPct || (f.jitter_ms || 0) > limits.jitterMs) {
        reasons.push('loss');
      }
      if ((f.rtt_ms || 0) > limits.rttMs) {
        reasons.push('rtt');
      }
      if (rate < (f.video ? limits.videoKbps : limits.audioKbps)) {
        reasons.push('bitrate');
      }
      return reasons;
    };
    let verdict = 'good';
    let reasons = past(PRECALL_LIMITS.poor);
    if (reasons.length) {
      verdict = 'poor';
    } else {
      reasons = past(PRECALL_LIMITS.fair);
      verdict = reasons.length ? 'fair' : 'good';
    }
    if (verdict !== 'good' && f.protocol === 'tcp') {
      reasons.push('tcp');
    }
    const titles = { good: 'Good', fair: 'Fair — it should work', poor: 'Poor — the call may not work well' };
    const advice = reasons.length ? reasons.map((r) => PRECALL_ADVICE[r]).join(' ') : PRECALL_ADVICE.good;
    return { verdict: verdict, reasons: reasons, title: titles[verdict], advice: advice };
  }

  /** `POST /api/precall/token`: a short-lived token for a private throwaway room. */
  async function precallToken(baseUrl) {
    let response;
    try {
      response = await fetch((baseUrl || '') + '/api/precall/token', { method: 'POST' });
    } catch (err) {
      throw new OpenConsultError('connection_failed', 'Cannot reach the server');
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = (body && body.error) || {};
      const failure = new OpenConsultError(error.code || 'http_' + response.status, error.message || 'HTTP ' + response.status);
      failure.retryAfterS = Number(response.headers.get('Retry-After')) || null;
      throw failure;
    }
    return body;
  }

  /** A moving picture and a quiet tone, for a network test on a device with no camera or microphone. */
  function syntheticStream() {
    const canvas = document.createElement('canvas');
    canvas.width = 640;
    canvas.height = 360;
    const g = canvas.getContext('2d');
    let frame = 0;
    const timer = setInterval(() => {
      frame += 1;
      g.fillStyle = 'hsl(' + (frame * 7) % 360 + ', 60%, 50%)';
      g.fillRect(0, 0, 640, 360);
      g.fillStyle = '#fff';
      g.fillRect((frame * 9) % 640, 120, 80, 120);
    }, 33);
    const stream = canvas.captureStream(30);
    const Context = window.AudioContext || window.webkitAudioContext;
    let context = null;
    if (Context) {
      context = new Context();
      const tone = context.createOscillator();
      const quiet = context.createGain();
      quiet.gain.value = 0.01;
      const out = context.createMediaStreamDestination();
      tone.connect(quiet).connect(out);
      tone.start();
      stream.addTrack(out.stream.getAudioTracks()[0]);
    }
    stream._stopSynthetic = () => {
      clearInterval(timer);
      if (context) {
        context.close().catch(() => {});
      }
    };
    return stream;
  }

  /** Totals of one peer connection's getStats() report, for differences over the test. */
  function precallTotals(report) {
    const t = { bytesSent: 0, packetsSent: 0, bytesReceived: 0, packetsReceived: 0, packetsLost: 0,
      remoteLost: 0, jitterMs: null, rttMs: null, pair: null };
    const byId = new Map();
    report.forEach((s) => byId.set(s.id, s));
    let pair = null;
    report.forEach((s) => {
      if (s.type === 'outbound-rtp') {
        t.bytesSent += s.bytesSent || 0;
        t.packetsSent += s.packetsSent || 0;
      } else if (s.type === 'inbound-rtp') {
        t.bytesReceived += s.bytesReceived || 0;
        t.packetsReceived += s.packetsReceived || 0;
        t.packetsLost += Math.max(0, s.packetsLost || 0);
        if (typeof s.jitter === 'number') {
          t.jitterMs = Math.max(t.jitterMs || 0, s.jitter * 1000);
        }
      } else if (s.type === 'remote-inbound-rtp') {
        t.remoteLost += Math.max(0, s.packetsLost || 0);
        if (typeof s.roundTripTime === 'number' && t.rttMs === null) {
          t.rttMs = s.roundTripTime * 1000;
        }
      } else if (s.type === 'transport' && s.selectedCandidatePairId) {
        pair = byId.get(s.selectedCandidatePairId) || pair;
      }
    });
    if (!pair) {
      report.forEach((s) => {
        if (s.type === 'candidate-pair' && s.state === 'succeeded' && s.nominated) {
          pair = s;
        }
      });
    }
    if (pair) {
      const local = byId.get(pair.localCandidateId) || {};
      const remote = byId.get(pair.remoteCandidateId) || {};
      t.pair = {
        local_candidate_type: local.candidateType || null,
        remote_candidate_type: remote.candidateType || null,
        protocol: local.protocol || null,
        relay_protocol: local.relayProtocol || null,
      };
      if (typeof pair.currentRoundTripTime === 'number') {
        t.rttMs = pair.currentRoundTripTime * 1000;
      }
    }
    return t;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  /** Resolves true once `pc()` is connected, false at `deadline` (ms since the epoch) or if it failed. */
  async function connectedBy(pc, deadline) {
    while (Date.now() < deadline) {
      const current = pc();
      if (current && current.connectionState === 'connected') {
        return true;
      }
      await sleep(100);
    }
    return false;
  }

  /**
   * One run: publish, subscribe to it back, measure for `durationMs`. Resolves `[figures, session]`:
   * the session is left to the caller (to log the result in it), null when it is already gone.
   */
  async function precallRun(options, stream, policy, durationMs, progress) {
    let keep = null;
    const figures = await precallMeasure(options, stream, policy, durationMs, progress, (session) => {
      keep = session;
    });
    return [figures, keep];
  }

  async function precallMeasure(options, stream, policy, durationMs, progress, keepSession) {
    const started = Date.now();
    const deadline = started + options.connectTimeoutMs;
    const figures = { connected: false, policy: policy, up_kbps: null, down_kbps: null, up_loss_pct: null,
      down_loss_pct: null, rtt_ms: null, jitter_ms: null, local_candidate_type: null, remote_candidate_type: null,
      protocol: null, relay_protocol: null, video: stream.getVideoTracks().length > 0, session_id: null,
      ice_servers: 0, turn: false };
    let session = null;
    try {
      session = await connect({ url: options.url, token: options.token, iceTransportPolicy: policy, reconnect: false });
      figures.session_id = session.sessionId;
      figures.ice_servers = session.iceServers.length;
      figures.turn = session.iceServers.some((server) => [].concat(server.urls || []).some((u) => /^turns?:/.test(u)));
      if (policy === 'relay' && !figures.turn) {
        return figures;
      }
      progress({ phase: 'connecting', policy: policy });
      const publisher = await session.publish(stream, { name: 'Pre-call test', videoSource: 'camera' });
      if (!(await connectedBy(() => publisher.pc, deadline))) {
        return figures;
      }
      let subscription = null;
      while (!subscription && Date.now() < deadline) {
        try {
          subscription = await session.subscribe(publisher.streamId);
        } catch (err) {
          if (err.code !== 'not_found') {
            throw err;
          }
          await sleep(200); // announced once its media is up: a moment after the peer connects
        }
      }
      if (!subscription || !(await connectedBy(() => subscription.pc, deadline))) {
        return figures;
      }
      figures.connected = true;
      progress({ phase: 'measuring', policy: policy, elapsedMs: 0, durationMs: durationMs });
      const up0 = precallTotals(await publisher.getStats());
      const down0 = precallTotals(await subscription.getStats());
      const t0 = Date.now();
      while (Date.now() - t0 < durationMs) {
        await sleep(Math.min(1000, durationMs - (Date.now() - t0)));
        progress({ phase: 'measuring', policy: policy, elapsedMs: Date.now() - t0, durationMs: durationMs });
      }
      const up1 = precallTotals(await publisher.getStats());
      const down1 = precallTotals(await subscription.getStats());
      const seconds = Math.max(0.001, (Date.now() - t0) / 1000);
      const round = (x) => (x === null || !isFinite(x) ? null : Math.round(x * 10) / 10);
      figures.up_kbps = round(((up1.bytesSent - up0.bytesSent) * 8) / 1000 / seconds);
      figures.down_kbps = round(((down1.bytesReceived - down0.bytesReceived) * 8) / 1000 / seconds);
      const sent = up1.packetsSent - up0.packetsSent;
      figures.up_loss_pct = sent > 0 ? round((100 * Math.max(0, up1.remoteLost - up0.remoteLost)) / sent) : null;
      const lost = Math.max(0, down1.packetsLost - down0.packetsLost);
      const got = down1.packetsReceived - down0.packetsReceived;
      figures.down_loss_pct = lost + got > 0 ? round((100 * lost) / (lost + got)) : null;
      figures.rtt_ms = round(up1.rttMs !== null ? up1.rttMs : down1.rttMs);
      figures.jitter_ms = round(down1.jitterMs);
      Object.assign(figures, up1.pair || {});
      return figures;
    } catch (err) {
      if (session) {
        session.leave().catch(() => {});
        session = null;
      }
      throw err;
    } finally {
      if (session) {
        keepSession(session); // joined even when the media did not connect: the result is logged there
      }
    }
  }

  /**
   * The pre-call network test through the SFU: with a fresh token for a private room (`options.token`,
   * else `POST /api/precall/token`), publish `options.stream` (default: a synthetic picture and tone),
   * subscribe to it back for `durationMs` (10 s) and measure upstream and downstream bitrate, loss,
   * round trip, jitter and the candidate pair; with TURN among the ICE servers, a second shorter run
   * relay-only. Media not through within `connectTimeoutMs` (10 s) gives `cannot_connect`.
   * `onProgress({phase, policy, elapsedMs, durationMs})` follows it. Resolves
   * `{verdict, reasons, title, advice, figures, relay}` (`relay`: the relay-only run's figures and
   * verdict, or null); the result is logged as a `precallTest` client event in `options.reportTo`
   * (a joined session, e.g. the patient's consultation) or else in the test's own session.
   */
  async function runPrecallTest(options) {
    options = Object.assign({ durationMs: 10000, connectTimeoutMs: 10000 }, options || {});
    const progress = typeof options.onProgress === 'function' ? options.onProgress : () => {};
    progress({ phase: 'token' });
    if (!options.token) {
      options.token = (await precallToken(options.baseUrl)).token;
    }
    const synthetic = options.stream ? null : syntheticStream();
    const stream = options.stream || synthetic;
    try {
      const failed = (err) => [{ connected: false, error: (err && (err.code || err.name)) || 'error',
        video: stream.getVideoTracks().length > 0, ice_servers: 0, turn: false }, null];
      const [figures, session] = await precallRun(options, stream, 'all', options.durationMs, progress).catch(failed);
      const result = Object.assign({ figures: figures, relay: null }, precallVerdict(figures));
      if (figures.turn && options.relayOnly !== false) {
        const [relay, relaySession] = await precallRun(options, stream, 'relay', Math.min(5000, options.durationMs),
          progress).catch(failed);
        if (relaySession) {
          relaySession.leave().catch(() => {});
        }
        result.relay = Object.assign({ figures: relay }, precallVerdict(relay));
      }
      const report = {
        verdict: result.verdict,
        up_kbps: figures.up_kbps, down_kbps: figures.down_kbps, up_loss_pct: figures.up_loss_pct,
        down_loss_pct: figures.down_loss_pct, rtt_ms: figures.rtt_ms, jitter_ms: figures.jitter_ms,
        video: figures.video, ice_servers: Math.min(64, figures.ice_servers),
      };
      for (const key of ['local_candidate_type', 'remote_candidate_type', 'protocol', 'relay_protocol']) {
        if (figures[key]) {
          report[key] = figures[key];
        }
      }
      if (figures.session_id) {
        report.test_session_id = figures.session_id;
      }
      if (result.relay) {
        report.relay_verdict = result.relay.verdict;
      }
      for (const key of Object.keys(report)) {
        if (report[key] === null) {
          delete report[key];
        }
      }
      result.report = report;
      // Logged for support: in the given session (the patient's consultation), else in the test's
      // own session while it is still joined (its id is the reference support asks for).
      const logTo = options.reportTo || session;
      result.logged = logTo ? await logTo.reportEvent('precallTest', report) : false;
      if (session) {
        await session.leave().catch(() => {});
      }
      return result;
    } finally {
      if (synthetic) {
        synthetic._stopSynthetic();
        synthetic.getTracks().forEach((track) => track.stop());
      }
    }
  }

  /** The pre-call test's figures as rows of plain words for a page: `[[label, value], …]`. */
  function precallRows(result) {
    const f = (result && result.figures) || {};
    const num = (x, unit, digits) => (typeof x === 'number' ? x.toFixed(digits || 0) + ' ' + unit : 'not measured');
    const kinds = { host: 'direct', srflx: 'direct through your router (NAT)', prflx: 'direct through your router (NAT)',
      relay: 'through the relay server' };
    const rows = [
      ['Sending', num(f.up_kbps, 'kbit/s')],
      ['Receiving', num(f.down_kbps, 'kbit/s')],
      ['Lost on the way there', num(f.up_loss_pct, '%', 1)],
      ['Lost on the way back', num(f.down_loss_pct, '%', 1)],
      ['Round trip', num(f.rtt_ms, 'ms')],
      ['Jitter', num(f.jitter_ms, 'ms')],
    ];
    if (f.local_candidate_type) {
      const how = kinds[f.local_candidate_type] || f.local_candidate_type;
      const proto = f.relay_protocol ? f.protocol + ', relay over ' + f.relay_protocol : f.protocol;
      rows.push(['Connection', how + ' (' + f.local_candidate_type + ', ' + String(proto).toUpperCase() + ')']);
    }
    if (result && result.relay) {
      rows.push(['Through the relay only', result.relay.title]);
    }
    return rows;
  }

  return {
    VERSION: VERSION,
    deviceErrorKind: deviceErrorKind,
    checkDevices: checkDevices,
    precallVerdict: precallVerdict,
    PRECALL_LIMITS: PRECALL_LIMITS,
    runPrecallTest: runPrecallTest,
    precallRows: precallRows,
    inboundVideoStats: inboundVideoStats,
    PROTOCOL: PROTOCOL,
    EVENTS: SESSION_EVENTS,
    WORKFLOW_EVENTS: WORKFLOW_EVENTS,
    connect: connect,
    walkIn: walkIn,
    decodeToken: decodeToken,
    mediaFailureText: mediaFailureText,
    MAX_MEDIA_RESTARTS: MAX_MEDIA_RESTARTS,
    MEDIA_CONNECT_TIMEOUT_MS: MEDIA_CONNECT_TIMEOUT_MS,
    pageParams: pageParams,
    OpenConsultError: OpenConsultError,
    Session: Session,
    Publisher: Publisher,
    Subscription: Subscription,
  };
});
