"""Deterministic randomness and the built-in word lists of the synthetic tasks (`tasks`)."""

from __future__ import annotations

import hashlib
import random
import uuid
from typing import Any


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from SHA-256 of the parts' ``str``: identical across processes and machines,
    unlike ``hash()``, which Python randomises per process for str."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# Built in so nothing is downloaded (RULER draws from wonderwords' lists). Common, concrete, mostly
# single-token words, so a cwe entry costs about the same number of tokens whatever the word.
_NOUNS = tuple(dict.fromkeys("""
apple table chair window garden river mountain forest ocean island bridge castle village city
street road train plane boat ship car truck bicycle horse cow sheep goat pig chicken duck rabbit
mouse tiger lion bear wolf fox deer eagle owl snake frog fish whale shark dolphin turtle spider
bee ant butterfly flower tree leaf branch root seed grass stone rock sand desert valley lake
pond stream cloud rain snow storm wind thunder lightning moon star planet earth fire water ice
metal gold silver iron copper glass paper book letter pencil pen brush paint canvas music piano
guitar violin drum song dance movie camera phone radio computer screen keyboard clock watch
bell lamp candle mirror door wall floor roof kitchen bedroom bathroom garage office school library
museum hospital church market shop bank hotel restaurant bakery farm factory harbor airport
station tower tunnel fence gate path ladder rope bucket basket box bag bottle cup plate bowl
spoon fork knife pot pan oven stove fridge sink towel blanket pillow bed sofa carpet curtain
shirt jacket coat dress skirt shoe boot hat scarf glove sock belt ring necklace button pocket
bread cheese butter milk egg sugar salt pepper rice pasta soup salad cake cookie pie honey jam
tea coffee juice wine beer orange lemon banana grape cherry peach pear plum melon tomato potato
carrot onion garlic bean corn pumpkin mushroom cabbage lettuce doctor nurse teacher student
farmer baker pilot captain soldier artist writer singer driver judge lawyer king queen prince
princess knight wizard giant dragon robot ghost angel pirate sailor hunter friend neighbor
family child baby mother father sister brother uncle aunt cousin hammer nail screw wheel engine
motor battery wire cable pipe valve pump switch lever magnet compass map globe flag coin stamp
ticket card gift toy ball kite puzzle game chess dice balloon ribbon feather shell pearl diamond
crystal marble brick tile cement wood plank log axe saw shovel rake tent cabin hut nest cave
cliff shore beach wave tide harbor canal dam well fountain statue painting poem story novel
magazine newspaper journal diary calendar schedule ladder helmet shield sword arrow bow spear
cannon rocket satellite telescope microscope laboratory engine anchor sail oar compass lantern
""".split()))

_ADJECTIVES = tuple(dict.fromkeys("""
quiet bright gentle ancient brave calm clever curious eager fancy fierce golden happy honest
humble jolly kind lively lucky mighty noble polite proud rapid silent silver simple sleepy
smooth steady swift tender tiny warm wild wise young bold crisp dusty early fresh frozen grand
hidden hollow lonely misty narrow orange purple rusty shiny sturdy sunny tidy velvet wooden
""".split()))

# Passkey filler of Mohtashami & Jaggi (2023), also RULER's "noise" haystack; one sentence per unit.
_NOISE = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


def _noise(n: int) -> list[str]:
    return [_NOISE[i % len(_NOISE)] for i in range(n)]


def _distinct_ints(rng: random.Random, k: int, lo: int, hi: int) -> list[int]:
    return rng.sample(range(lo, hi + 1), k)


def _uuid(rng: random.Random) -> str:
    """A random-looking (version 4) UUID string drawn from ``rng`` (``uuid.uuid4`` is not seedable)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _coded_words(rng: random.Random, k: int) -> list[str]:
    """k distinct random lowercase "coded words" of 3-6 letters (RULER's fwe vocabulary)."""
    out: list[str] = []
    while len(out) < k:
        w = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 6)))
        if w not in out:
            out.append(w)
    return out


def _zipf_bag(vocab: list[str], alpha: float, n: int, seed: int) -> list[str]:
    """Exactly n words, word r (0-based) about n * (r + 1)^-alpha / H times (largest remainder), shuffled."""
    weights = [(r + 1) ** -alpha for r in range(len(vocab))]
    raw = [n * w / sum(weights) for w in weights]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(vocab)), key=lambda i: counts[i] - raw[i])[:n - sum(counts)]:
        counts[i] += 1
    bag = [w for w, c in zip(vocab, counts) for _ in range(c)]
    random.Random(seed).shuffle(bag)
    return bag
