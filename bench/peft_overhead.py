"""Decode time of the same weights plain and wrapped by peft: a random rank-8 LoRA on every linear layer (fp32 adapter
weights, peft's default), the adapter switched off, and bf16 adapter weights. Run alone: `.venv/bin/python bench/peft_overhead.py [MODEL]`."""
import time, torch, sys, tempfile
from safetylock.models import load_model, attach_adapter
from peft import LoraConfig, get_peft_model

spec = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b-instruct"
model, tok = load_model(spec)
print("base dtype", next(model.parameters()).dtype)
tok.padding_side = "left"
prompts = [tok.apply_chat_template([{"role": "user", "content": f"Explain topic number {i} in detail."}], tokenize=False, add_generation_prompt=True) for i in range(16)]
enc = tok(prompts, return_tensors="pt", padding=True)

def run(m, label, n=24):
    with torch.no_grad():
        m.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)
        t = time.perf_counter(); m.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        print(f"{label}: {time.perf_counter()-t:.2f} s for {n} tokens x 16", flush=True)

run(model, "plain")
cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"], init_lora_weights=False)
d = tempfile.mkdtemp()
pm = get_peft_model(model, cfg); pm.save_pretrained(d); model = pm.unload()
wrapped = attach_adapter(model, d)
print("lora A dtype", next(p for n, p in wrapped.named_parameters() if "lora_A" in n).dtype)
run(wrapped, "lora (as loaded)")
with wrapped.disable_adapter():
    run(wrapped, "lora disabled")
for n, p in wrapped.named_parameters():
    if "lora_" in n: p.data = p.data.to(torch.bfloat16)
run(wrapped, "lora bf16")
