"""Engine logprobs in OpenAI's two shapes: completions' parallel lists and chat's content entries.
Each takes one completion output (a stream delta or a whole final output) and shapes all its tokens."""
from deployments.protocol import (ChatCompletionLogProb, ChatCompletionLogProbs, ChatCompletionLogProbsContent,
                                  CompletionLogProbs)
from engine.outputs import CompletionOutput, Logprob


def completion_logprobs(o: CompletionOutput, num: int | None, offset: int, detokenize) -> CompletionLogProbs | None:
    """offset: characters of the choice's text before this output (text_offset counts from there)."""
    if num is None or o.logprobs is None:
        return None
    lp = CompletionLogProbs()
    for k in range(len(o.token_ids)):
        text, logprob, top = _top(o, k, num, detokenize)
        lp.text_offset.append(offset)
        lp.tokens.append(text)
        lp.token_logprobs.append(logprob)
        lp.top_logprobs.append({text: logprob, **dict(top)})
        offset += len(text)
    return lp


def chat_logprobs(o: CompletionOutput, wanted: bool, num: int, detokenize) -> ChatCompletionLogProbs | None:
    if not wanted or o.logprobs is None:
        return None
    content = []
    for k in range(len(o.token_ids)):
        text, logprob, top = _top(o, k, num, detokenize)
        content.append(ChatCompletionLogProbsContent(
            token=text, logprob=logprob, bytes=list(text.encode()),
            top_logprobs=[ChatCompletionLogProb(token=t, logprob=v, bytes=list(t.encode())) for t, v in top]))
    return ChatCompletionLogProbs(content=content)


def _top(o: CompletionOutput, k: int, num: int, detokenize) -> tuple[str, float, list[tuple[str, float]]]:
    """Token k of an output: its text, its logprob and the `num` most likely alternatives."""
    token_id, entry = o.token_ids[k], o.logprobs[k]
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
    top = [(_text(t, lp, detokenize), lp.logprob) for t, lp in ranked[:num]]
    return _text(token_id, entry[token_id], detokenize), entry[token_id].logprob, top


def _text(token_id: int, lp: Logprob, detokenize) -> str:
    return lp.decoded_token if lp.decoded_token is not None else detokenize([token_id])
