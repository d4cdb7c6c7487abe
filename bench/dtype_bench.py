"""Time greedy generation of one model in several dtypes: python bench/dtype_bench.py MODEL bfloat16 float32."""
import time, torch, sys
from safetylock.models import load_model
from safetylock.generate import generate
from safetylock.data import load_benchmark
ps=[p.text for p in load_benchmark('overrefusal','extract')[:8]]
for dt in sys.argv[2:]:
    m,t=load_model(sys.argv[1], dtype=dt)
    t0=time.perf_counter(); r=generate(m,t,ps,max_new_tokens=32,batch_size=8); el=time.perf_counter()-t0
    print(dt, f"{el:.1f}s", sum(g.tokens for g in r.generations) if hasattr(r,'generations') else '', flush=True)
