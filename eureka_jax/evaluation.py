"""Held-out evaluation with the same sampler and reward code as training, and the record ->
prompt-row preprocessing the training pipeline shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from eureka_jax import distributed, families
from eureka_jax.batch import Buckets
from eureka_jax.data import load_records
from eureka_jax.errors import InputError
from eureka_jax.processing.examples import gather_examples, make_preprocess
from eureka_jax.sampler import Sampler, SamplingConfig, decode_texts


@dataclasses.dataclass
class EvalResult:
    accuracy: float
    pass_at_k: float
    items: list[dict[str, Any]]


class Evaluator:
    """Greedy (or k-sample) accuracy on a held-out file, scored by the training reward code."""

    def __init__(self, *, graphdef, processor, model_config,
                 data: str, max_examples: int | None, batch_size: int, buckets: Buckets,
                 system_prompt: str | None, max_new_tokens: int,
                 stop_token_ids: Sequence[int], reward_pool, put_on_device,
                 num_samples: int = 1, temperature: float = 1.0, seed: int = 0):
        records, _ = load_records(data, decode_images=True)
        if max_examples:
            records = records[:max_examples]
        if not records:
            raise InputError(f"{data}: no evaluation records")
        preprocess = make_preprocess(processor, model_config, system_prompt, max(buckets.lengths))
        # Each process preprocesses its share of every batch; the shares are gathered, so
        # every process holds the whole set.
        self.examples = []
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            self.examples += gather_examples(
                [preprocess(r) for r in batch[distributed.own_share(len(batch))]])
        self.batch_size = batch_size
        self.buckets = buckets
        self.processor = processor
        self.reward_pool = reward_pool
        self.put_on_device = put_on_device
        self.num_samples = num_samples
        self.seed = seed
        greedy = num_samples == 1
        self.sampler = Sampler(graphdef, SamplingConfig(
            num_samples=num_samples, max_new_tokens=max_new_tokens, greedy=greedy,
            temperature=temperature, stop_token_ids=tuple(stop_token_ids)))

    def run(self, params) -> EvalResult:
        k = self.num_samples
        texts, examples = [], []
        tokenizer = self.processor.tokenizer
        for start in range(0, len(self.examples), self.batch_size):
            chunk = self.examples[start:start + self.batch_size]
            # A short last batch is padded with copies so the compiled shape stays the same.
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            batch = self.put_on_device(families.collate_prompts(
                [e.row for e in padded], self.buckets,
                pad_token_id=self.processor.pad_token_id,
                prompt_keys=[e.index for e in padded]))
            output = self.sampler(params, batch, self.seed)
            tokens, lengths = distributed.to_host((output.tokens_NxL, output.lengths_N))
            texts += decode_texts(tokenizer, tokens[:len(chunk) * k], lengths[:len(chunk) * k])
            examples.extend(chunk)
        answers = [e.answer for e in examples for _ in range(k)]
        extras = [{"id": e.record_id, **e.extra} for e in examples for _ in range(k)]
        # Each process scores its share; the accuracies are gathered onto every process.
        own = distributed.own_share(len(texts))
        results = self.reward_pool.submit(texts[own], answers[own], extras[own]).result()
        correct = distributed.gather_shares(
            np.asarray([r.accuracy for r in results], np.float32), len(texts)).reshape(-1, k)
        items = [{"id": e.record_id, "answer": e.answer,
                  "completions": texts[i * k:(i + 1) * k],
                  "accuracy": correct[i].tolist()} for i, e in enumerate(examples)]
        return EvalResult(accuracy=float(correct[:, 0].mean()),
                          pass_at_k=float(correct.max(axis=1).mean()), items=items)

    def accuracy(self, params) -> float:
        return self.run(params).accuracy
