"""
Conversations about an image: multi-turn chat that encodes the image once.

Dragonfly reads the image block, then Llama-3 chat turns (docs/release-facts.md#image-block and
docs/release-facts.md#prompt-format; data/formats.py writes the release's training conversations
the same way, with no system prompt):

    [image block] <|begin_of_text|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{question 1}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer 1}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{question 2}<|eot_id|> ...

(no line breaks between the pieces in the real sequence). A `Conversation` keeps the LLM's KV
cache from one turn to the next: the image block (the ViT over 41 crops, 2098 positions in the
release) is computed and prefilled once, and a turn runs the LLM only over its new tokens (the
user turn and the assistant header) after the cached prefix, then decodes, with model.py's
`prefill` and `decode_one_token` (the steps `Dragonfly.generate` takes too). Earlier answers
stay in the context as the ids that were generated, not re-encoded text (the same text can
encode to other ids). A conversation that outgrows its cache gets a larger one holding the same
keys and values (`llama.KVCache.grow`): the prefix is never recomputed.

Every turn ends with <|eot_id|>: the model's own, or one appended when the answer was cut short
(the token limit, the end of the context, Ctrl-C; a partial answer stays in the history). A
generated <|end_of_text|> is replaced by it, as Llama-3 closes every turn with <|eot_id|>.

`chat` is sample.py's interactive loop: readline editing and history at the `>` prompt,
/image FILE, /reset, /quit (or Ctrl-D); Ctrl-C stops an answer, Ctrl-C at the prompt quits.
"""
import json
import sys

import torch

from lib.images import crop_image
from model import decode_one_token, new_caches, next_token, prefill


class ContextFull(ValueError):
    """The next turn does not fit in what is left of the context."""

    def __init__(self, left: int, needed: int, context: int):
        self.left, self.needed, self.context = left, needed, context
        super().__init__(f"{left} of the context's {context} positions are left; this turn needs {needed} "
                         "(its question and one answer token)")


class NotFinite(ValueError):
    """The model's output holds NaN or infinity: its weights are damaged or its training diverged."""

    def __init__(self):
        super().__init__("the model's output is NaN or infinite: its weights are damaged or its training diverged; "
                         "no answer is given (use an earlier checkpoint)")


class Conversation:
    def __init__(self, model, tokenizer, image=None):
        """model: a Dragonfly (one conversation at a time uses its LLM); image: `crops.Crops`
        from `lib.images.crop_image`, or None for a text-only chat."""
        self.model, self.tok = model, tokenizer
        self.caches = []  # one llama.KVCache per layer, kept across turns
        self.set_image(image)

    @torch.no_grad()
    def set_image(self, image):
        """Start over about `image` (crops.Crops, or None): its block is computed here, once."""
        self.image, self.crops = None, image  # the crops: for looked.py's picture of an answer
        if image is not None:
            device = self.model.llm.lm_head.weight.device
            pixels = torch.as_tensor(image.pixels)[None].to(device)
            self.image = self.model.image_block(pixels, [image.medium_grid], [image.high_grid])  # (1, P, dim)
        self.cached = 0  # positions (image block + text) whose keys and values are in the cache
        self.reset()

    def reset(self):
        """Forget the text. The image block's cache stays: it does not depend on the text."""
        self.tokens = []  # text ids from <|begin_of_text|> on; the last one may not be cached yet
        self.cached = min(self.cached, self.image_len)
        self.finish = None  # how the last answer ended: "stop", "length", "context" or "interrupted"

    @property
    def image_len(self) -> int:
        return 0 if self.image is None else self.image.shape[1]

    @property
    def context(self) -> int:
        return self.model.cfg.llm.max_seq_len

    @property
    def positions_left(self) -> int:
        return max(0, self.context - self.image_len - len(self.tokens))

    def turn_ids(self, question: str) -> list:
        """The ids a question adds: its user turn and the assistant header (after
        <|begin_of_text|> on the first turn). Every turn starts with a special token, so
        encoding turn by turn gives the ids of encoding the whole conversation at once."""
        ids = self.tok.encode_prompt(question)
        return ids[1:] if self.tokens else ids

    def ask(self, question: str, max_new_tokens=256, temperature=0.0, top_p=1.0, generator=None):
        """A generator of the answer's (token id, log-probability), one token at a time (log-softmax
        of the float32 logits); stop tokens are not yielded. The answer and its closing <|eot_id|>
        join the history however the iteration ends (a stop token, a limit, `close()`, Ctrl-C).
        Raises ContextFull here, before any work, when the question does not fit."""
        new = self.turn_ids(question)
        room = self.positions_left - len(new)
        if room < 1:
            raise ContextFull(self.positions_left, len(new) + 1, self.context)
        return self._answer(new, min(max_new_tokens, room), max_new_tokens, temperature, top_p, generator)

    @torch.no_grad()
    def _answer(self, new, n, max_new_tokens, temperature, top_p, generator):
        stop_ids, cached, answer_from = self.tok.stop_ids, self.cached, len(self.tokens) + len(new)
        self.tokens += new
        self.finish = "interrupted"
        try:
            logits = self._prefill(reserve=n)
            for step in range(n):
                token, logprob = next_token(logits[None], temperature, top_p, generator)
                token, logprob = int(token), float(logprob)
                self.tokens.append(token)  # kept if Ctrl-C comes before it is decoded
                if token in stop_ids:
                    self.finish = "stop"
                    return
                yield token, logprob
                if step == n - 1:
                    self.finish = "length" if n == max_new_tokens else "context"
                    return
                logits = self._decode(token)
        finally:  # the one place a turn is closed (or undone)
            if self.cached == cached:  # stopped during the prefill: the question never happened
                del self.tokens[answer_from - len(new):]
            elif self.tokens[-1] in stop_ids and len(self.tokens) > answer_from:
                self.tokens[-1] = self.tok.eot_id  # never decoded: decoding ends at a stop token
            else:
                self.tokens.append(self.tok.eot_id)

    def _prefill(self, reserve: int):
        """`model.prefill` of every position not yet in the cache (the image block on the first
        turn; then the last answer's closing tokens and the new turn) -> the last one's logits
        (vocab,); `reserve` more slots are made room for, for the answer."""
        llm, P, start = self.model.llm, self.image_len, self.cached
        ids = torch.tensor(self.tokens[max(0, start - P):], device=llm.lm_head.weight.device)
        x = llm.embed(ids)[None]                                            # (1, T, dim)
        if start < P:  # the first turn: the image block goes in with its text (start is 0)
            x = torch.cat([self.image.to(x.dtype), x], dim=1)
        self._reserve(start + x.shape[1] + reserve)
        return self._counted(prefill(llm, self.caches, x, start)[0], start + x.shape[1])

    def _decode(self, token: int):
        """`model.decode_one_token` of the last answer token -> the next logits (vocab,)."""
        token = torch.tensor([token], device=self.model.llm.lm_head.weight.device)
        return self._counted(decode_one_token(self.model.llm, self.caches, token, self.cached)[0], self.cached + 1)

    def _counted(self, logits, cached: int):
        """The cache now holds `cached` positions, unless the logits are not finite."""
        if not torch.isfinite(logits.sum()):  # finite only if every logit is; 20x faster than isfinite
            raise NotFinite()  # before the cache counts these positions: a prefill's turn is undone
        self.cached = cached
        return logits

    def _reserve(self, n: int):
        """A cache of at least n positions: allocated on first use, then doubled (up to the
        context) keeping its contents, so a long chat reallocates a few times, not every turn."""
        have = self.caches[0].k.shape[2] if self.caches else 0
        if n <= have:
            return
        size = min(self.context, max(n, 2 * have))
        if not self.caches:
            self.caches = new_caches(self.model.llm, 1, size)
        for cache in self.caches:
            cache.grow(size)


def answer(conv, question, as_json=False, out=sys.stdout, **sampling) -> dict:
    """Ask and print the answer: streamed as text (holding back half a multi-byte character),
    or as one JSON object {"text", "token_ids", "logprobs"}. Ctrl-C propagates after the partial
    answer is printed and closed in the history."""
    ids, logprobs, printed, failed = [], [], "", False
    steps = conv.ask(question, **sampling)
    try:
        for token, logprob in steps:
            ids.append(token)
            logprobs.append(logprob)
            if not as_json:
                text = conv.tok.decode(ids)
                if not text.endswith("\ufffd"):
                    out.write(text[len(printed):])
                    out.flush()
                    printed = text
    except NotFinite:
        failed = True
        raise
    finally:
        steps.close()
        result = {"text": conv.tok.decode(ids), "token_ids": ids, "logprobs": logprobs}
        if not failed:  # allow_nan=False: a NaN would make the line invalid JSON
            out.write(json.dumps(result, allow_nan=False) + "\n" if as_json else result["text"][len(printed):] + "\n")
        elif printed:
            out.write("\n")
        out.flush()
    return result


HELP = "/image FILE: another image (starts over)   /reset: start over   /quit or Ctrl-D: quit   Ctrl-C: stop an answer"


def chat(conv, as_json=False, on_first_answer=None, check_image=None, **sampling):
    """The interactive loop on a terminal (`/image FILE` crops FILE for the model);
    on_first_answer(question, result): called after the first answer about each image;
    check_image(path): raises ValueError for an /image FILE to refuse (sample.py: the --show
    file, which the first answer's drawing would replace)."""
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:  # not on every platform; the chat works without it
        pass
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: quit
            print()
            return
        if not line:
            continue
        command, _, arg = line.partition(" ")
        arg = arg.strip().strip("'\"")  # a dragged-in path may come quoted
        if line == "/quit":
            return
        if line == "/reset":
            conv.reset()
            print(f"(new conversation, {conv.positions_left} positions free)", file=sys.stderr)
            continue
        if command == "/image" and arg:
            try:
                if check_image is not None:
                    check_image(arg)
                conv.set_image(crop_image(arg, conv.model.cfg.crops))
            except (ValueError, OSError) as e:  # the conversation goes on about the old image
                print(f"error: {e}", file=sys.stderr)
                continue
            print(f"(new conversation about {arg})", file=sys.stderr)
            continue
        if command[:1] == "/" and command[1:].isalpha():  # a mistyped command is not a question
            print(HELP, file=sys.stderr)
            continue
        first = not conv.tokens and conv.crops is not None
        try:
            result = answer(conv, line, as_json, **sampling)
        except ContextFull as e:
            print(f"context full: {e}; /reset starts over", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("(stopped)", file=sys.stderr)
            continue
        if conv.finish == "context":
            print(f"(the context is full: {conv.positions_left} positions left; /reset starts over)", file=sys.stderr)
        if first and on_first_answer:
            on_first_answer(line, result)
