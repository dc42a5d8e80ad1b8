"""Defences against guessed event codes: weak chosen codes refused, failed lookups throttled.

Chosen codes. An organizer may pick the code, and people pick words. A chosen
code is refused (400 ``invalid_request``, ``param: code``, with a generated
code offered instead) when it has fewer than ``MIN_CHOSEN_LENGTH``
characters, fewer than ``MIN_DISTINCT`` different characters, or when, once
digits and ``-``/``_`` are set aside, it is made only of common words (the
built-in list below: event words, years, keyboard walks, ...), like
``hackathon-2026`` or ``Workshop_2027``.

Failed lookups. Each client address (the address the platform forwards in
``X-Forwarded-For``, its last entry being the one the Functions front end
appends, else the socket peer) may send ``FAILED_LOOKUPS_PER_MINUTE`` (default
10) credentials with an unknown code per ``WINDOW_SECONDS``. Past that, the
address is throttled: every code it has not itself used successfully before
gets 429 ``rate_limited`` with ``Retry-After``, without a storage lookup, the
same answer for a right code as for a wrong one, so the throttle is no oracle
(a code valid elsewhere, even one this worker saw in use from other addresses,
is refused like any guess). The codes the address did use successfully before
it was throttled keep working, so a classroom behind one NAT keeps working
while one laptop guesses; a classmate who had not yet sent her first request
waits for the window to pass. Each address remembers its last
``MAX_CODES_PER_ADDRESS`` codes (as their stored hashes, never the codes).
The counts live in each worker's memory (a cache: an attacker that reaches N
instances gets N times the attempts; docs/organizers.md, *Guessed codes*, has the figures).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable

from proxy.errors import CapExceeded, InvalidRequest

MIN_CHOSEN_LENGTH = 10
MIN_DISTINCT = 6
WINDOW_SECONDS = 60.0
MAX_CODES_PER_ADDRESS = 32
_MAX_ADDRESSES = 50_000

COMMON_WORDS = frozenset(
    """
    admin api azure openai gpt chatgpt ai llm ml code event events hackathon hack hacks hacker hackers
    workshop workshops class classes course lab labs demo test testing dev prod password passw0rd secret
    welcome hello letmein qwerty qwertz azerty asdf asdfgh zxcv abc abcd abcdef xyz key token access
    login guest user users student students school university uni summer winter spring autumn fall
    team teams conf conference meetup bootcamp camp training day days week build builders coding coder
    coders python java javascript microsoft github copilot cloud data science the my our event-code
    attendee attendees participant participants organizer org community group private public free
    """.split()  # noqa: SIM905
)
_WORDS = re.compile(r"[a-z]+")


def weak_code_reason(code: str) -> str | None:
    """Why a chosen code is too easy to guess, or None when it is not."""
    if len(code) < MIN_CHOSEN_LENGTH:
        return f"it has {len(code)} characters; a chosen code needs at least {MIN_CHOSEN_LENGTH}"
    if len(set(code.lower())) < MIN_DISTINCT:
        return f"it uses fewer than {MIN_DISTINCT} different characters"
    words = _WORDS.findall(code.lower())
    if all(word in COMMON_WORDS or _spelled_by(word, COMMON_WORDS) for word in words):
        return "it is made of common words and digits, which are tried first"
    return None


def _spelled_by(word: str, vocabulary: frozenset[str]) -> bool:
    """Whether ``word`` is a run of vocabulary words ("hackathonworkshop")."""
    reachable = [True] + [False] * len(word)
    for end in range(1, len(word) + 1):
        reachable[end] = any(reachable[start] and word[start:end] in vocabulary for start in range(end))
    return reachable[-1]


def check_chosen_code(code: str, alternative: Callable[[], str]) -> None:
    """Refuse a weak chosen code, naming the reason and offering a generated one."""
    reason = weak_code_reason(code)
    if reason is not None:
        raise InvalidRequest(
            f"This code is too easy to guess: {reason}. Choose a longer, less predictable one, or leave the code "
            f"out to get a generated one such as {alternative()}.",
            param="code",
        )


def client_address(forwarded_for: str | None, peer: str | None) -> str:
    """The client's address: the last ``X-Forwarded-For`` entry (set by the platform), else the socket peer."""
    if forwarded_for:
        last = forwarded_for.split(",")[-1].strip()
        if last.startswith("["):  # [IPv6]:port
            return last[1:].split("]", 1)[0]
        if last.count(":") == 1:  # IPv4:port
            return last.split(":", 1)[0]
        return last
    return peer or "unknown"


class FailedLookups:
    """Per client address, the times of its recent unknown codes (a sliding window) and the codes it used
    successfully (per worker)."""

    def __init__(self, per_window: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_window = per_window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._used: dict[str, dict[str, None]] = {}  # address: hashes of the codes it used, oldest first

    def check(self, address: str, code_hash: str) -> None:
        """Raise 429 ``rate_limited`` if the address has used up its failures for now and this code is not
        one it used successfully before; the same 429 whether the code is right or wrong."""
        failures = self._failures.get(address)
        if failures is None or len(failures) < self._per_window:
            return
        if code_hash in self._used.get(address, ()):
            return
        now = self._clock()
        while failures and failures[0] <= now - WINDOW_SECONDS:
            failures.popleft()
        if len(failures) >= self._per_window:
            wait = max(1, int(failures[0] + WINDOW_SECONDS - now + 0.999))
            raise CapExceeded(
                f"Too many unknown event codes from your address: {self._per_window} per "
                f"{WINDOW_SECONDS:g} s are allowed. Check the code the organizer shared, and retry in {wait} s.",
                code="rate_limited",
                retry_after=wait,
            )

    def failed(self, address: str) -> None:
        if len(self._failures) > _MAX_ADDRESSES:
            self._failures.clear()
        failures = self._failures.setdefault(address, deque(maxlen=self._per_window))
        failures.append(self._clock())

    def succeeded(self, address: str, code_hash: str) -> None:
        """The address used this code successfully: a throttle lets it through from now on."""
        used = self._used.get(address)
        if used is None:
            if len(self._used) > _MAX_ADDRESSES:
                self._used.clear()
            used = self._used[address] = {}
        elif code_hash in used:
            return
        if len(used) >= MAX_CODES_PER_ADDRESS:
            del used[next(iter(used))]
        used[code_hash] = None
