"""Pure H264 helpers for forwarding without a codec: keyframe detection on RTP payloads
(RFC 6184, packetization-mode 1) and the frame size a sequence parameter set describes
(ITU-T H.264 §7.3.2.1.1), for the keyframe gate and the timeline's dimensionsChanged.

An RTP payload carries one NAL unit (types 1-23), several in a STAP-A (24), or a fragment of
one in an FU-A (28). A packet starts a keyframe when it carries an SPS (7) or the first
fragment of an IDR slice (5): encoders put SPS and PPS in front of every IDR, so the first
packet of an IDR access unit is the one with the SPS (Chrome and libx264 aggregate SPS+PPS
in a STAP-A), or the IDR itself when no SPS precedes it.

Everything here reads bytes a publisher sent: any truncation or nonsense gives False or
None, never an exception, and every loop is bounded by the input's length or a small cap.
"""

from __future__ import annotations

from typing import Final

NAL_IDR: Final = 5
NAL_SPS: Final = 7
NAL_STAP_A: Final = 24
NAL_FU_A: Final = 28

#: profile_idc values whose SPS carries chroma format, bit depths and scaling lists (§7.3.2.1.1).
_HIGH_PROFILES: Final = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})
#: An SPS is a few dozen bytes; a longer one (with scaling lists) stays far under this.
MAX_SPS_BYTES: Final = 512
#: The most macroblocks a side may have at level 6.2 (8192 px / 16); larger is nonsense.
_MAX_MBS_SIDE: Final = 1024


def nal_types(payload: bytes) -> list[int]:
    """The NAL unit types an RTP payload carries: one for a single NAL unit, those aggregated
    in a STAP-A, and for an FU-A the fragmented unit's type when this is its first fragment
    (none for a later fragment). Empty for an empty, truncated or unsupported payload."""
    if not payload:
        return []
    kind = payload[0] & 0x1F
    if 0 < kind < NAL_STAP_A:
        return [kind]
    if kind == NAL_FU_A:
        if len(payload) < 2 or not payload[1] & 0x80:
            return []
        return [payload[1] & 0x1F]
    if kind == NAL_STAP_A:
        types = []
        pos = 1
        while pos + 2 < len(payload):
            size = (payload[pos] << 8) | payload[pos + 1]
            if size == 0 or pos + 2 + size > len(payload):
                break
            types.append(payload[pos + 2] & 0x1F)
            pos += 2 + size
        return types
    return []


def h264_is_keyframe(payload: bytes) -> bool:
    """True if this RTP payload carries an SPS or starts an IDR slice (see the module header)."""
    if not payload:
        return False
    kind = payload[0] & 0x1F
    if kind == NAL_SPS or kind == NAL_IDR:
        return True
    if kind == NAL_FU_A:
        return len(payload) > 1 and payload[1] & 0x80 != 0 and payload[1] & 0x1F in (NAL_IDR, NAL_SPS)
    if kind == NAL_STAP_A:
        return any(t == NAL_SPS or t == NAL_IDR for t in nal_types(payload))
    return False


def find_sps(payload: bytes) -> bytes | None:
    """The SPS NAL unit (header byte included) a single-NAL or STAP-A payload carries, else None."""
    if not payload:
        return None
    kind = payload[0] & 0x1F
    if kind == NAL_SPS:
        return payload[:MAX_SPS_BYTES]
    if kind == NAL_STAP_A:
        pos = 1
        while pos + 2 < len(payload):
            size = (payload[pos] << 8) | payload[pos + 1]
            if size == 0 or pos + 2 + size > len(payload):
                return None
            if payload[pos + 2] & 0x1F == NAL_SPS:
                return payload[pos + 2 : pos + 2 + min(size, MAX_SPS_BYTES)]
            pos += 2 + size
    return None


def _rbsp(nal: bytes) -> bytes:
    """The NAL unit's payload without its header byte and emulation prevention bytes (00 00 03)."""
    return nal[1:].replace(b"\x00\x00\x03", b"\x00\x00")


class _Bits:
    """A big-endian bit reader over an RBSP; reading past the end raises ValueError."""

    def __init__(self, data: bytes) -> None:
        self.value = int.from_bytes(data, "big")
        self.left = len(data) * 8

    def u(self, n: int) -> int:
        if n > self.left:
            raise ValueError("SPS truncated")
        self.left -= n
        return (self.value >> self.left) & ((1 << n) - 1)

    def ue(self) -> int:
        zeros = 0
        while not self.u(1):
            zeros += 1
            if zeros > 31:
                raise ValueError("exp-Golomb code longer than 32 bits")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) // 2 if code & 1 else -(code // 2)


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last = next_scale = 8
    for _ in range(size):
        if next_scale:
            next_scale = (last + bits.se() + 256) % 256
        last = next_scale or last


def sps_frame_size(sps: bytes) -> tuple[int, int] | None:
    """(width, height) in pixels of the pictures an SPS NAL unit (header byte included)
    describes, after its frame cropping; None when it is not an SPS or does not parse."""
    if len(sps) < 4 or sps[0] & 0x1F != NAL_SPS:
        return None
    try:
        return _parse_size(_Bits(_rbsp(sps[:MAX_SPS_BYTES])))
    except ValueError:
        return None


def _parse_size(bits: _Bits) -> tuple[int, int] | None:
    profile_idc = bits.u(8)
    bits.u(16)  # constraint flags, level_idc
    bits.ue()  # seq_parameter_set_id
    chroma_format_idc = 1
    separate_colour_plane = 0
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = bits.ue()
        if chroma_format_idc > 3:
            return None
        if chroma_format_idc == 3:
            separate_colour_plane = bits.u(1)
        bits.ue()  # bit_depth_luma_minus8
        bits.ue()  # bit_depth_chroma_minus8
        bits.u(1)  # qpprime_y_zero_transform_bypass_flag
        if bits.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format_idc != 3 else 12):
                if bits.u(1):
                    _skip_scaling_list(bits, 16 if i < 6 else 64)
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        bits.u(1)  # delta_pic_order_always_zero_flag
        bits.se()  # offset_for_non_ref_pic
        bits.se()  # offset_for_top_to_bottom_field
        cycle = bits.ue()
        if cycle > 255:
            return None
        for _ in range(cycle):
            bits.se()
    elif poc_type != 2:
        return None
    bits.ue()  # max_num_ref_frames
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_map_units = bits.ue() + 1
    frame_mbs_only = bits.u(1)
    if not frame_mbs_only:
        bits.u(1)  # mb_adaptive_frame_field_flag
    bits.u(1)  # direct_8x8_inference_flag
    height_mbs = (2 - frame_mbs_only) * height_map_units
    if width_mbs > _MAX_MBS_SIDE or height_mbs > _MAX_MBS_SIDE:
        return None
    width, height = width_mbs * 16, height_mbs * 16
    if bits.u(1):  # frame_cropping_flag
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
        # Crop units (Table 6-1): chroma subsampling, and field pairs for interlaced frames.
        if chroma_format_idc == 0 or separate_colour_plane:
            unit_x, unit_y = 1, 2 - frame_mbs_only
        else:
            unit_x = 1 if chroma_format_idc == 3 else 2
            unit_y = (2 if chroma_format_idc == 1 else 1) * (2 - frame_mbs_only)
        width -= unit_x * (left + right)
        height -= unit_y * (top + bottom)
        if width <= 0 or height <= 0:
            return None
    return width, height


def h264_keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) from the SPS an RTP payload carries, else None."""
    sps = find_sps(payload)
    return sps_frame_size(sps) if sps is not None else None
