"""Runs ``openconsult`` with aiortc's codec factories wrapped so that every decoder
or encoder the server builds is recorded (one line per construction) in the file
named by CODEC_PROBE_FILE. The call tests assert the file stays empty."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import aiortc.codecs
import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender

PROBE_FILE = os.environ.get("CODEC_PROBE_FILE", "")


def record(what: str, codec: Any) -> None:
    with open(PROBE_FILE, "a") as f:
        f.write(f"{what} {getattr(codec, 'mimeType', codec)}\n")
        f.write("".join(traceback.format_stack(limit=6)).replace("\n", "\n    ") + "\n")


def install() -> None:
    original_decoder = aiortc.codecs.get_decoder
    original_encoder = aiortc.codecs.get_encoder

    def get_decoder(codec: Any) -> Any:
        record("decoder", codec)
        return original_decoder(codec)

    def get_encoder(codec: Any) -> Any:
        record("encoder", codec)
        return original_encoder(codec)

    # The receiver and sender modules import the factories by name; patch both places.
    for module in (aiortc.codecs, aiortc.rtcrtpreceiver):
        module.get_decoder = get_decoder  # type: ignore[attr-defined]
    for module in (aiortc.codecs, aiortc.rtcrtpsender):
        module.get_encoder = get_encoder  # type: ignore[attr-defined]


if __name__ == "__main__":
    if not PROBE_FILE:
        sys.exit("CODEC_PROBE_FILE must name the probe file")
    install()
    from signalling.cli import main

    sys.exit(main(sys.argv[1:]))
