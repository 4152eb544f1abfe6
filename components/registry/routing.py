"""Which arm of a canary answers a request: sticky per user, so a user sees one model throughout. Pure.

The key is the authenticated rater when the request carries a rater's token (a rater cannot pick an arm by sending
another user id), else the app's end user (`"user"` in the body, or the X-User header); a request with neither is
routed at random. A user's arm is a hash of the key salted with the challenger's version: the same user stays on
one arm for the whole canary, and a new canary draws its users afresh.
"""

from __future__ import annotations

import hashlib
import random

CHAMPION, CHALLENGER = "champion", "challenger"
MAX_USER_CHARS = 256


def arm(key: str | None, share: float, salt: str, rng: random.Random | None = None) -> str:
    """The arm of a request: challenger for a `share` of the keys (the first 8 bytes of sha256(salt, key) as a
    fraction below share), else champion; no key: a random draw with the same share."""
    if share <= 0:
        return CHAMPION
    if key is None:
        draw = (rng or random).random()
    else:
        digest = hashlib.sha256(f"{salt}\0{key}".encode("utf-8", "surrogatepass")).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
    return CHALLENGER if draw < share else CHAMPION
