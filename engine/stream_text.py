"""The text of a stream whose engine left it to the caller (an engine in a process of its own): vLLM v1
detokenizes in the server's process too, so the process that runs the steps only samples tokens.

Filled in on the caller's side when its reader takes an output, the steps since its last read merged into
one (a paced reader's interval, or a reader lagging behind the engine): each choice's new token ids through
its own incremental detokenizer in one call, the prompt's last tokens as context (they arrive with the
first output). A choice that ends with "stop" ended on a stop token or EOS (no stop string reaches here), which
is not text, as the engine's own detokenizing leaves it out."""
from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput
from engine.params import SamplingParams


class StreamText:
    __slots__ = ("tokenizer", "params", "_choices")

    def __init__(self, tokenizer, params: SamplingParams):
        self.tokenizer, self.params = tokenizer, params
        self._choices: dict[int, IncrementalDetokenizer] = {}

    def fill(self, out: RequestOutput) -> None:
        for o in out.outputs:
            detokenizer = self._choices.get(o.index)
            if detokenizer is None:
                detokenizer = self._choices[o.index] = IncrementalDetokenizer(self.tokenizer, out.prompt_token_ids,
                                                                               self.params)
            finished = o.finish_reason is not None
            detokenizer.update(o.token_ids[:-1] if o.finish_reason == "stop" else o.token_ids)
            o.text = detokenizer.take_delta(finished)
