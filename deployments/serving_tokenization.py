"""The tokenizer routes of a model server: /tokenize and /detokenize."""
from deployments.errors import APIError
from deployments.protocol import (ChatCompletionRequest, DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                                  TokenizeResponse)
from engine import AsyncLLM


class TokenizationServing:
    def __init__(self, engine: AsyncLLM):
        self.engine = engine

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        if req.messages is not None:
            prompt = chat_prompt(self.engine, req)
            add_special = bool(req.add_special_tokens)  # the chat template already wrote them
        else:
            prompt, add_special = req.prompt, req.add_special_tokens is not False
        ids = await self.engine.tokenize_async(prompt, add_special_tokens=add_special)  # on the engine's thread
        strs = self.engine.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids, token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        vocab = len(self.engine.tokenizer)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"tokens must be in [0, {vocab}), got {bad[:5]}", 400, "tokens")
        return DetokenizeResponse(prompt=self.engine.detokenize(req.tokens))


def chat_prompt(engine: AsyncLLM, req: ChatCompletionRequest | TokenizeRequest) -> str:
    """The prompt text of a chat or /tokenize request: the one templating path (engine.tokenizer)."""
    return engine.apply_chat_template([m.template_dict() for m in req.messages], req.add_generation_prompt,
                                      req.continue_final_message, req.chat_template_kwargs)
