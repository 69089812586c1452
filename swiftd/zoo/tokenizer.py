"""The zoo's tokenizer: a real CLIP byte-level BPE vocabulary, learned deterministically from a word list.

SD checkpoints ship CLIPTokenizer folders (vocab.json + merges.txt); CLIP's own vocabulary cannot be
downloaded here, so the zoo learns one of the same form from WORDS. Every word still tokenizes.
"""

from __future__ import annotations

import heapq
from functools import lru_cache
from pathlib import Path

from swiftd.zoo.files import write_json

# Common English plus the words prompts are made of. Every other word still tokenizes (down to
# single bytes, as CLIP's does for rare words); these just get whole-word tokens.
WORDS = """
a an the of and or but if then than so as at by for from in into on onto off out over under up down
with without about above below after before between through during to too very not no yes all any
each every some many much more most few less least other another such same own only just also even
still again once here there where when why how what which who whom whose this that these those it its
i me my we us our you your he him his she her they them their is are was were be been being am have
has had do does did done will would can could shall should may might must make made take took get got
go went come came see saw look looking looks show shown give gave find found think know knew want use
used work call try ask need feel felt become leave put mean keep let begin seem help talk turn start
run running ran move live lived believe hold bring happen write wrote sit sitting stand standing lose
pay meet include continue set learn change lead understand watch follow stop create speak read allow
add spend grow open walk walking win offer remember love consider appear buy wait serve die send
expect build stay fall cut reach kill remain suggest raise pass sell require report decide pull
riding ride flying fly swimming swim jumping jump dancing dance playing play eating eat sleeping sleep
man woman men women boy girl child children people person friend family mother father king queen
knight wizard warrior robot astronaut soldier pirate princess monk samurai ninja scientist doctor
cat cats dog dogs horse horses bird birds fish lion tiger bear wolf fox rabbit owl eagle dragon
elephant monkey deer cow sheep goat duck frog snake butterfly whale dolphin shark unicorn
house home city town village street road bridge tower castle temple church building room window door
garden park forest tree trees flower flowers grass leaf mountain mountains hill river lake sea ocean
beach island desert field sky cloud clouds sun moon star stars space planet earth world fire water
ice snow rain storm wind light dark shadow night day morning evening sunset sunrise winter summer
spring autumn time year years
red orange yellow green blue purple pink brown black white gray grey gold golden silver colorful
big small large little tall short long old new young beautiful pretty cute ugly happy sad angry
calm quiet loud bright soft hard warm cold hot wet dry clean dirty rich poor strong weak fast slow
high low deep wide empty full real fake good bad best better great
photo photograph photography portrait landscape painting paint drawing sketch illustration art
artwork artist style styled render rendering rendered concept digital oil watercolor acrylic ink
pencil charcoal canvas poster cover anime manga cartoon comic pixel vector abstract surreal
realistic photorealistic hyperrealistic detailed intricate highly ultra sharp focus bokeh blur
blurry lens camera shot closeup close macro wide angle cinematic dramatic lighting studio volumetric
octane unreal engine trending artstation masterpiece quality resolution hd 4k 8k award winning
by greg rutkowski van gogh monet picasso rembrandt vermeer klimt hokusai da vinci
fantasy science fiction scifi futuristic cyberpunk steampunk medieval ancient modern vintage retro
minimalist baroque gothic renaissance impressionism impressionist cubism expressionism pop
view scene background foreground composition color colors texture pattern shape line edge edges
depth map mask pose face eyes hair hand hands body dress shirt hat helmet armor sword shield crown
car train ship boat plane airplane bicycle motorcycle rocket spaceship
food coffee tea cake bread apple fruit pizza wine table chair bed book lamp cup bottle
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=4)
def learn_bpe(
    max_merges: int = 1500, words: tuple[str, ...] | None = None
) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Learn BPE merges over `words` (default WORDS); return (vocab, merges) in CLIP's vocabulary order.

    CLIP's order: the 256 byte symbols, the same with "</w>" (end of word), one entry per merge,
    then <|startoftext|> and <|endoftext|>. Ties between equally frequent pairs break on the pair
    itself, so the result depends only on WORDS.
    """
    byte_enc = bytes_to_unicode()
    counts: dict[tuple[str, ...], int] = {}
    for word in WORDS if words is None else words:
        chars = [byte_enc[b] for b in word.lower().encode("utf-8")]
        symbols = tuple(chars[:-1] + [chars[-1] + "</w>"])
        counts[symbols] = counts.get(symbols, 0) + 1

    # Classic BPE: repeatedly merge the most frequent adjacent pair. Pair counts are kept up to date
    # incrementally (only words containing the merged pair change) with a lazy max-heap, so this
    # takes a fraction of a second rather than recounting every pair for every merge.
    words = [list(symbols) for symbols in sorted(counts)]
    freq = [counts[tuple(w)] for w in words]
    pair_count: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}

    def account(i: int, sign: int) -> None:
        for pair in zip(words[i], words[i][1:]):
            pair_count[pair] = pair_count.get(pair, 0) + sign * freq[i]
            if sign > 0:
                where.setdefault(pair, set()).add(i)
            heapq.heappush(heap, (-pair_count[pair], pair))

    heap: list[tuple[int, tuple[str, str]]] = []
    for i in range(len(words)):
        account(i, +1)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        neg, best = heapq.heappop(heap)
        if -neg != pair_count.get(best, 0) or -neg <= 0:
            continue  # stale entry; ties pop in pair order, so the result depends only on WORDS
        merges.append(best)
        for i in sorted(where.pop(best)):
            account(i, -1)
            symbols, out, j = words[i], [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            account(i, +1)

    tokens = list(byte_enc.values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for tok in tokens:  # two merge paths can spell the same token; keep its first id
        vocab.setdefault(tok, len(vocab))
    return vocab, tuple(merges)


# Pad token of tokenizer / tokenizer_2: real SDXL's second tokenizer pads with "!".
TOKENIZER_PADS = ("<|endoftext|>", "!")


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>", words: tuple[str, ...] | None = None) -> None:
    """Write a CLIPTokenizer folder the way SD checkpoints ship it (vocab.json + merges.txt)."""
    vocab, merges = learn_bpe(words=words)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "vocab.json", vocab, sort_keys=False)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    def special(content):
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": pad_token,
            "unk_token": "<|endoftext|>",
        },
    )
    write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": special("<|startoftext|>"),
            "do_lower_case": True,
            "eos_token": special("<|endoftext|>"),
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": special("<|endoftext|>"),
        },
    )
