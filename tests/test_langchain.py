"""LangChain's OpenAI and Azure chat models and embeddings, unchanged, through the proxy."""

from __future__ import annotations

from langchain_openai import AzureChatOpenAI, ChatOpenAI, OpenAIEmbeddings

from tests.conftest import MakeEvent


async def test_langchain_chat_models_and_embeddings(app: str, make_event: MakeEvent) -> None:
    key = (await make_event()).key("lc")
    openai_style = ChatOpenAI(base_url=f"{app}/api/v1", api_key=key, model="gpt-4o-mini", max_retries=0)
    azure_style = AzureChatOpenAI(
        azure_endpoint=f"{app}/api/v1",
        api_key=key,
        api_version="2024-10-21",
        azure_deployment="gpt-4o-mini",
        max_retries=0,
    )
    for model in (openai_style, azure_style):
        answer = model.invoke("Say hello to the workshop")
        assert isinstance(answer.content, str) and answer.content
        streamed = "".join(str(chunk.content) for chunk in model.stream("Say hello to the workshop"))
        assert streamed == answer.content
    # check_embedding_ctx_length off: it would fetch tiktoken's tables from the internet.
    embeddings = OpenAIEmbeddings(
        base_url=f"{app}/api/v1",
        api_key=key,
        model="text-embedding-3-small",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    vectors = embeddings.embed_documents(["event", "proxy"])
    assert len(vectors) == 2 and len(vectors[0]) == 1536
