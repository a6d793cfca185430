"""End to end with the real OpenAI SDK on a tiny model: upload JSONL, create a job, follow its
events to `succeeded`, chat with `fine_tuned_model`; loraplex's greedy tokens for the trained
adapter reproduce the trained answer, and equal peft + transformers' greedy tokens on the
adapter as stored."""

import io
import json

import pytest
import torch
from openai import OpenAI

from tests.api_server import LiveServer, server_options
from tests.finetune_helpers import MEMORISE, wait_for_job

MODEL = "@cf/test/tiny-llama"
PROMPTS = [f"say {w}" for w in ("one", "two", "three", "four")]
DATA = ("\n".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "ARR"}]})
                  for p in PROMPTS) + "\n").encode()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    live = LiveServer.start(server_options(model_dir, tmp_path_factory.mktemp("data")))
    yield live
    live.stop()


def test_job_to_served_finetune_matches_peft(server, model_dir, tmp_path):
    account_id, token = server.account("e2e")
    client = OpenAI(api_key=token, base_url=f"{server.url}/client/v4/accounts/{account_id}/ai/v1", max_retries=0)
    f = client.files.create(file=("t.jsonl", io.BytesIO(DATA)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, seed=1, suffix="pirate",
                                         hyperparameters=MEMORISE)
    job = wait_for_job(client, job.id)
    assert job.status == "succeeded", job.error
    events = list(client.fine_tuning.jobs.list_events(job.id))
    assert any(e.data and "train_loss" in e.data for e in events)
    assert job.fine_tuned_model.startswith(MODEL + ":pirate-")

    finetune = server.ctx.registry.get_finetune(account_id, job.fine_tuned_model.rpartition(":")[2])
    replies = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        reply = client.chat.completions.create(model=job.fine_tuned_model, messages=messages, max_tokens=3,
                                               temperature=0)
        replies.append(reply.choices[0].message.content)
    assert sum(r == "ARR" for r in replies) >= 3, replies
    assert replies == peft_replies(server, model_dir, finetune, tmp_path / "adapter", max_tokens=3)


def peft_replies(server, model_dir, finetune, folder, max_tokens: int) -> list[str]:
    """peft + transformers, greedy, on the adapter's two files fetched from the object store."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder.mkdir()
    for file_name, asset in finetune.assets.items():
        server.ctx.store.fetch_to(asset.object_key, folder / file_name)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), folder).eval()
    tokenizer, replies = server.ctx.tokenizer, []
    for prompt in PROMPTS:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids):].tolist()
        ends = [i for i, t in enumerate(out) if t in tokenizer.eos_token_ids]
        replies.append(tokenizer.decode(out[:ends[0]] if ends else out))
    return replies
