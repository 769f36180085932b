"""The device check's result on a queue entry: what the patient can send and the plain words the
clinician's queue shows, for every pair of states; kept across save/load, and read from entries
saved before devices were recorded."""

from __future__ import annotations

import itertools

import pytest

from rooms.model import SessionId
from rooms.waiting_room import Arrival, Devices, DeviceState, QueueEntry, WaitingRoom

WORDS = {DeviceState.DENIED: "{} denied", DeviceState.NOT_FOUND: "no {}", DeviceState.IN_USE: "{} in use",
         DeviceState.ERROR: "{} not working", DeviceState.SKIPPED: "no {} (skipped)"}


@pytest.mark.parametrize(("camera", "microphone"), list(itertools.product(DeviceState, DeviceState)))
def test_media_and_problems_for_every_pair(camera: DeviceState, microphone: DeviceState) -> None:
    d = Devices(camera, microphone)
    unknown = camera is DeviceState.UNKNOWN and microphone is DeviceState.UNKNOWN
    video, audio = camera is DeviceState.OK, microphone is DeviceState.OK
    want = ("unknown" if unknown else "audio_video" if video and audio else "audio_only" if audio
            else "video_only" if video else "none")
    assert d.media == want
    expected = [WORDS[s].format(name) for name, s in (("camera", camera), ("microphone", microphone)) if s in WORDS]
    assert list(d.problems) == expected
    assert Devices.from_doc(d.to_doc()) == d


def test_examples_in_the_clinicians_words() -> None:
    assert Devices(DeviceState.DENIED, DeviceState.OK).problems == ("camera denied",)
    assert Devices(DeviceState.NOT_FOUND, DeviceState.OK).problems == ("no camera",)
    assert Devices(DeviceState.OK, DeviceState.IN_USE).problems == ("microphone in use",)


def test_entry_keeps_devices_and_reads_old_documents() -> None:
    room = WaitingRoom("wr", "Cardiology", "cardio")
    devices = Devices(DeviceState.DENIED, DeviceState.OK)
    qe = QueueEntry(SessionId("s1"), "p1").enter(room, Arrival.ON_TIME, "p1", 1000, devices)
    assert QueueEntry.from_doc(qe.to_doc()) == qe and qe.devices == devices
    # Entering again (after leaving) without a new check keeps the last one.
    again = qe.abandon(2000).enter(room, Arrival.ON_TIME, "p1", 3000)
    assert again.devices == devices
    assert again.with_devices(Devices()).devices == Devices()
    doc = qe.to_doc()
    del doc["devices"]  # saved before devices were recorded
    assert QueueEntry.from_doc(doc).devices == Devices(DeviceState.UNKNOWN, DeviceState.UNKNOWN)
