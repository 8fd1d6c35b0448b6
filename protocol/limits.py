"""Every limit of terminal wire protocol v1, in one place, with how the limits relate.

A limit is a named constant with its unit last. Changing one changes what a terminal may send,
so it is a protocol change: update docs/protocol.md (the limits table is checked by a test) and
docs/THREAT_MODEL.md in the same commit.
"""

from __future__ import annotations

from typing import Final

protocol_version: Final = 1

# Frame layout: length prefix, then header, body and MAC trailer (docs/protocol.md, "Frames").
length_prefix_bytes: Final = 2
header_bytes: Final = 16  # includes the length prefix
mac_bytes: Final = 16  # HMAC-SHA256 truncated to its first 16 bytes
frame_bytes_max: Final = 16_384  # whole frame, length prefix included
body_bytes_min: Final = 1  # the smallest MessagePack map is one byte
body_bytes_max: Final = frame_bytes_max - header_bytes - mac_bytes
frame_bytes_min: Final = header_bytes + body_bytes_min + mac_bytes

# Keys and nonces.
terminal_key_bytes_min: Final = 16  # AES-128 strength or more
terminal_key_bytes_max: Final = 64
nonce_bytes: Final = 16
session_key_bytes: Final = 32  # one HMAC-SHA256 key per direction

# Sequence numbers: frame sequence per session and direction, terminal sequence per business day.
sequence_max: Final = 2**32 - 1
terminal_sequence_max: Final = 999_999
key_version_max: Final = 255

# Field sizes.
terminal_id_chars: Final = 8
meter_number_chars_min: Final = 6
meter_number_chars_max: Final = 20
account_number_chars_max: Final = 20
receipt_number_chars_max: Final = 32
receipt_lines_max: Final = 40
receipt_line_chars_max: Final = 48
tokens_per_result_max: Final = 8
token_digits: Final = 20
advices_per_batch_max: Final = 32
customer_name_chars_max: Final = 64
address_chars_max: Final = 128
detail_chars_max: Final = 200
software_version_chars_max: Final = 32
amount_minor_max: Final = 10**12  # far above any payment; bounds arithmetic on untrusted input
units_wh_max: Final = 10**12
count_max: Final = 10**6
interval_s_max: Final = 86_400

# Kiosk HTTPS mapping: one JSON message per request body.
kiosk_body_bytes_max: Final = 65_536

# How the limits relate. A failure here is a bug in this file, found at import time.
assert frame_bytes_max <= length_prefix_bytes + 0xFFFF, "the uint16 length prefix must be able to express every frame"
assert frame_bytes_min < frame_bytes_max
assert body_bytes_max > 0
assert header_bytes == length_prefix_bytes + 1 + 1 + terminal_id_chars + 4
assert 8 <= mac_bytes <= 32, "MAC trailer: at least 8 bytes, at most one SHA-256 output"
assert terminal_key_bytes_min >= 16 and terminal_key_bytes_max >= terminal_key_bytes_min
assert nonce_bytes >= 16
# The largest result must fit one frame: receipt text is the bulk of it (checked exactly by a test).
# (4 bytes per character is the UTF-8 worst case, 3 bytes the MessagePack string header.)
assert (
    receipt_lines_max * (receipt_line_chars_max * 4 + 3) + tokens_per_result_max * (token_digits + 1)
    < body_bytes_max * 3 // 4
)
assert kiosk_body_bytes_max >= 2 * body_bytes_max, "JSON of any frame body must fit a kiosk request"
