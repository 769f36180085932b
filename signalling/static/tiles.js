/*
 * Remote media tiles shared by the demo and consultation pages: one <figure> per
 * subscribed stream, with muted autoplaying video, sound through a separate
 * <audio> element, a caption, and a button when the browser blocks sound until a
 * user gesture. Labels are set as text, never as HTML.
 */
(function (root) {
  'use strict';

  function tileId(prefix, streamId) {
    return prefix + streamId.replace(/[^A-Za-z0-9_-]/g, '_');
  }

  /** Build a tile; the caller inserts it where its layout wants it, then calls start(). */
  function create({ id, streamId, label, mediaStream, soundText }) {
    const figure = document.createElement('figure');
    figure.className = 'tile remote';
    figure.id = id;
    figure.dataset.streamId = streamId;

    // Video is muted so autoplay is always allowed; sound plays through the audio element.
    const video = document.createElement('video');
    video.autoplay = true;
    video.playsInline = true;
    video.muted = true;
    video.setAttribute('autoplay', '');
    video.setAttribute('playsinline', '');
    video.setAttribute('muted', '');
    video.setAttribute('aria-label', 'Video from ' + label);
    video.srcObject = mediaStream;
    figure.appendChild(video);

    const audio = document.createElement('audio');
    audio.autoplay = true;
    audio.srcObject = mediaStream;
    figure.appendChild(audio);

    const caption = document.createElement('figcaption');
    caption.textContent = label;
    figure.appendChild(caption);

    function start() {
      video.play().catch(() => {});
      audio.play().catch(() => {
        if (!figure.isConnected || figure.querySelector('.sound')) {
          return;
        }
        const button = document.createElement('button');
        button.type = 'button';
        button.className = 'sound';
        button.textContent = soundText || 'Enable sound';
        button.setAttribute('aria-label', (soundText || 'Enable sound') + ' from ' + label);
        button.addEventListener('click', () => audio.play().then(() => button.remove(), () => {}));
        figure.appendChild(button);
      });
    }

    return { figure, start };
  }

  /** Stop and remove the tile with this id, if there is one. */
  function remove(id) {
    const figure = document.getElementById(id);
    if (figure) {
      for (const media of figure.querySelectorAll('video, audio')) {
        media.srcObject = null;
      }
      figure.remove();
    }
  }

  root.OpenConsultTiles = { tileId, create, remove };
})(window);
