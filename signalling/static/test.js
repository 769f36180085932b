/*
 * OpenConsult pre-call test page (/test, signalling/static/test.html), built on the SDK in
 * openconsult.js: camera preview and microphone level (OpenConsult.checkDevices: waits for the
 * person to answer the permission prompt; advice only), a speaker test tone, and the network test
 * through the SFU (OpenConsult.runPrecallTest: a private throwaway room from POST
 * /api/precall/token, ~10 s publishing and receiving its own stream back, the verdict by
 * OpenConsult.precallVerdict — the rules live there and in docs/operations.md).
 *
 * For tests and support staff the page exposes `window.precall`:
 *   precall.state    'checking' | 'ready' | 'running' | 'done' | 'error'
 *   precall.devices  {camera, microphone} as the device check found them
 *   precall.result   runPrecallTest's result ({verdict, title, advice, figures, relay, report}) or null
 *   precall.error    {code, message} when the test could not run, else null
 *   precall.elapsedMs  from the click to the verdict
 */
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const precall = { state: 'checking', devices: null, result: null, error: null, elapsedMs: null, stream: null };
  window.precall = precall;

  const WORDS = { ok: 'working', denied: 'not allowed', not_found: 'not found', in_use: 'in use by another program',
    error: 'not working' };

  function mark(id, ok, text) {
    $(id).dataset.ok = ok ? 'true' : 'false';
    $(id).textContent = text;
  }

  function allowHelp() {
    const ua = navigator.userAgent || '';
    if (/Firefox\//.test(ua)) {
      return 'In Firefox: click the camera icon at the left of the address bar and remove the block, then press "Check again".';
    }
    if (/Safari\//.test(ua) && !/Chrome\/|Chromium\//.test(ua)) {
      return 'In Safari: open Safari > Settings for this website and set Camera and Microphone to Allow, then press "Check again".';
    }
    return 'Click the camera icon (or the padlock) in the address bar, choose "Allow" for the camera and microphone, then press "Check again".';
  }

  let meter = null;

  function startMeter(stream) {
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context || !stream.getAudioTracks().length) {
      return;
    }
    const context = new Context();
    const analyser = context.createAnalyser();
    analyser.fftSize = 512;
    context.createMediaStreamSource(stream).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    const timer = setInterval(() => {
      analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const sample of samples) {
        sum += sample * sample;
      }
      const rms = Math.sqrt(sum / samples.length);
      $('precall-meter').value = rms > 0 ? Math.max(0, Math.min(1, (20 * Math.log10(rms) + 60) / 60)) : 0;
    }, 100);
    meter = { context: context, timer: timer };
    document.addEventListener('click', () => context.resume().catch(() => {}), { once: true });
  }

  function stopDevices() {
    if (meter) {
      clearInterval(meter.timer);
      meter.context.close().catch(() => {});
      meter = null;
    }
    if (precall.stream) {
      precall.stream.getTracks().forEach((track) => track.stop());
      precall.stream = null;
    }
  }

  async function checkDevices() {
    precall.state = 'checking';
    stopDevices();
    const found = await OpenConsult.checkDevices();
    precall.devices = { camera: found.camera, microphone: found.microphone };
    precall.stream = found.stream;
    if (found.stream) {
      $('precall-video').srcObject = found.stream;
      $('precall-video').play().catch(() => {});
      startMeter(found.stream);
    }
    mark('precall-camera', found.camera === 'ok', 'Camera: ' + (WORDS[found.camera] || found.camera));
    mark('precall-mic', found.microphone === 'ok', 'Microphone: ' + (WORDS[found.microphone] || found.microphone));
    const help = $('precall-device-help');
    const denied = found.camera === 'denied' || found.microphone === 'denied';
    help.hidden = !denied && found.camera === 'ok' && found.microphone === 'ok';
    help.textContent = denied ? allowHelp()
      : 'Connect a camera or headset and close other programs that use them, then press "Check again". ' +
        'You can still join your consultation: by voice only, or the clinic can phone you.';
    $('precall-devices-again').hidden = help.hidden;
    precall.state = 'ready';
  }

  $('precall-devices-again').addEventListener('click', () => checkDevices());

  $('precall-tone').addEventListener('click', () => {
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) {
      $('precall-tone-state').textContent = 'This browser cannot play the test tone.';
      return;
    }
    const context = new Context();
    const tone = context.createOscillator();
    const volume = context.createGain();
    tone.frequency.value = 440;
    volume.gain.value = 0.2;
    tone.connect(volume).connect(context.destination);
    tone.start();
    tone.stop(context.currentTime + 2);
    $('precall-tone-state').textContent = 'Playing… If you heard nothing, turn up the volume or choose other speakers.';
    tone.onended = () => {
      context.close().catch(() => {});
      $('precall-tone-state').textContent = 'Did you hear it? If not, check the volume and which speakers are chosen.';
    };
  });

  function showResult(result) {
    $('precall-result').hidden = false;
    $('precall-verdict').dataset.verdict = result.verdict;
    $('precall-verdict').textContent = result.title;
    $('precall-advice').textContent = result.advice;
    const list = $('precall-figures');
    list.replaceChildren();
    for (const [label, value] of OpenConsult.precallRows(result)) {
      const dt = document.createElement('dt');
      dt.textContent = label;
      const dd = document.createElement('dd');
      dd.textContent = value;
      list.append(dt, dd);
    }
    $('precall-reference').textContent = (result.figures && result.figures.session_id) || '—';
  }

  $('precall-start').addEventListener('click', async () => {
    const button = $('precall-start');
    button.disabled = true;
    precall.state = 'running';
    precall.result = null;
    precall.error = null;
    $('precall-result').hidden = true;
    const started = Date.now();
    try {
      const stream = precall.stream && precall.stream.getTracks().length ? precall.stream : undefined;
      const result = await OpenConsult.runPrecallTest({
        stream: stream,
        onProgress: (p) => {
          const what = p.policy === 'relay' ? 'through the relay server' : '';
          $('precall-progress').textContent = p.phase === 'measuring'
            ? 'Measuring ' + what + '… ' + Math.round((p.elapsedMs || 0) / 1000) + ' s'
            : 'Connecting to the video server ' + what + '…';
        },
      });
      precall.elapsedMs = Date.now() - started;
      precall.result = result;
      precall.state = 'done';
      $('precall-progress').textContent = '';
      showResult(result);
    } catch (err) {
      precall.elapsedMs = Date.now() - started;
      precall.error = { code: err.code || 'error', message: err.message || String(err) };
      precall.state = 'error';
      $('precall-progress').textContent = err.code === 'rate_limited'
        ? 'Many tests were run from your network just now. Please try again in a minute.'
        : 'The test could not run: ' + (err.message || err);
    } finally {
      button.disabled = false;
    }
  });

  checkDevices();
})();
