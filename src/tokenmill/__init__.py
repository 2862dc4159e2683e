"""tokenmill: LLM serving with a paged KV cache, continuous batching and an OpenAI-compatible edge."""

from tokenmill.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import tokenmill` (the gateway, the CLI's --help) never imports torch.
    if name == "LLM":
        from tokenmill.engine.llm import LLM

        return LLM
    raise AttributeError(name)
