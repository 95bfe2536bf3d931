"""Ray Serve deployments over the engine: model servers, the RAG pipeline, the OpenAI/vLLM-
compatible ingress, the pydantic protocol and the app builder that serve_config.yaml names.

Calling the models from Python (inside a Ray job or another deployment), without HTTP: each
model is a deployment named `<Kind>:<served model name>` (deployments.builder.deployment_name;
Kind is Embedder, Reranker, Classifier or Generator by task), in the application `default`
unless you named it otherwise. Its methods take and return the same pydantic objects the
HTTP routes parse and send (deployments.protocol):

    from ray import serve
    from deployments.builder import deployment_name
    from deployments.protocol import ChatCompletionRequest, EmbeddingRequest, RerankRequest

    embedder = serve.get_deployment_handle(deployment_name("embed", "sentence-transformers/all-MiniLM-L6-v2"),
                                           app_name="default")
    resp = await embedder.embeddings.remote(EmbeddingRequest(input=["a", "b"]))   # EmbeddingResponse
    # (outside asyncio: embedder.embeddings.remote(...).result())

    reranker = serve.get_deployment_handle(deployment_name("score", "smollm2-reranker"), app_name="default")
    ranked = await reranker.rerank.remote(RerankRequest(query="q", documents=["d1", "d2"]))

    generator = serve.get_deployment_handle(deployment_name("generate", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                                            app_name="default")
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=32, stream=True)
    async for chunk in generator.options(stream=True).chat_stream.remote(req):   # ChatCompletionStreamResponse
        ...  # one chunk per limits.stream_batching_interval_ms at most, with every token since the last

Methods: embeddings, score, rerank, classify, completions, completions_stream, chat, chat_stream,
tokenize, detokenize, describe, stats (see deployments.server.ModelServer). Errors arrive as the
exception the server raised (deployments.errors.APIError, or ValueError for bad input), wrapped
by Ray in RayTaskError; Serve raises BackPressureError when the deployment's queue is full.
serve.get_app_handle("default") is the HTTP ingress; use the model deployments' handles instead.
"""
