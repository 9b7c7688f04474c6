"""Reference outputs from transformers' PyTorch models, shared by the parity tests."""

import torch


def hf_greedy(model, prompts, new_tokens, eos_ids, pad_id):
    """transformers.generate on a left-padded batch of token-id prompts, greedy; per row the
    generated ids (cut after the first EOS) and the log-probability of each."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=list(eos_ids), pad_token_id=pad_id, output_scores=True,
                             return_dict_in_generate=True)
    rows = []
    for i, row in enumerate(out.sequences[:, width:].tolist()):
        end = next((t + 1 for t, token in enumerate(row) if token in eos_ids), len(row))
        logprobs = [torch.log_softmax(out.scores[t][i], -1)[row[t]].item() for t in range(end)]
        rows.append((row[:end], logprobs))
    return rows
