"""The helpers every benchmark shares (timing is measured on the GPU, never tested)."""

import io
import json

import numpy as np
import pytest

from benchmarks import common


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_prints_one_line_per_configuration_on_a_terminal_only():
  tty = _Terminal()
  progress = common.Progress(3, stream=tty)
  for label in ("a", "b", "c"):
    progress.step(label)
  lines = tty.getvalue().splitlines()
  assert len(lines) == 3
  assert lines[0].startswith("[1/3] a  elapsed ") and "remaining ~" in lines[0]
  assert lines[-1].endswith("remaining ~0m00s")
  pipe = io.StringIO()  # not a terminal: silent unless asked
  quiet = common.Progress(2, stream=pipe)
  assert "[1/2] x" in quiet.step("x")
  assert pipe.getvalue() == ""
  common.Progress(1, stream=pipe, enabled=True).step("y")
  assert "[1/1] y" in pipe.getvalue()


def test_clock_format():
  assert common.Progress._clock(75) == "1m15s"
  assert common.Progress._clock(3725) == "1h02m05s"


def test_write_result_records_the_device_and_versions(tmp_path):
  path = common.write_result("unit", {"x": 1}, tmp_path)
  data = json.loads(path.read_text())
  assert data["x"] == 1 and data["benchmark"] == "unit"
  assert data["environment"]["device"] and "jax" in data["environment"]["versions"]


def _buildable(decode_e2e, head_dim):
  """decode_e2e's caches that exist at head_dim (fractional widths in tiles need 128)."""
  import jax.numpy as jnp
  out = {}
  for name, make in decode_e2e.CACHES.items():
    try:
      make(1, 256, 2, head_dim, jnp.bfloat16)
    except ValueError as e:
      assert "no tile length" in str(e) and "3.5" in name, (name, e)
      continue
    out[name] = make
  configs = {n: getattr(make, "keywords", {}).get("config")
             for n, make in decode_e2e.CACHES.items()}
  fractional_tiles = {n for n, c in configs.items() if c is not None and c.layout == "tiles"
                      and not float(c.key_bits).is_integer()}
  assert set(decode_e2e.CACHES) - set(out) == fractional_tiles
  return out


def test_decode_e2e_capacity_counts_every_buffer():
  """The largest-batch figures come from the caches' shapes: check them against the
  caches' own memory reports on a small config."""
  import jax.numpy as jnp
  from benchmarks import decode_e2e
  from models.config import DecoderConfig
  cfg = DecoderConfig(vocab_size=64, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=64, ffn_dim=128)
  for name, make in _buildable(decode_e2e, 64).items():
    per_token, per_sequence, per_model = decode_e2e.cache_cost(cfg, make, probe_len=256)
    caches = [make(3, 512, 2, 64, jnp.bfloat16, layer=i) for i in range(3)]
    total = sum(c.memory_report()["total"] for c in caches)
    assert 3 * (per_token * 512 + per_sequence) + per_model == total, name
    assert decode_e2e.max_batch(total, (per_token, per_sequence, per_model), 512) == 3
  dense_per_token = decode_e2e.cache_cost(cfg, decode_e2e.CACHES["bf16"])[0]
  assert dense_per_token == 3 * 2 * 2 * 64 * 2  # layers × (K, V) × heads × D × bf16
  cap = decode_e2e.capacity(cfg, weights_bytes=0, memory_bytes=decode_e2e.RESERVE_BYTES + 2**30,
                            contexts=(4096,))
  assert "no tile length" in cap["caches"]["tq3.5-quintic-rope"]["unsupported"]
  ratio = cap["caches"]["tq3.5"]["batch_x_context_vs_bf16"]["4096"]
  assert 3.0 < ratio < 3.8  # d = 64: two fp16 norms per vector cost more than at d = 128
  # Named caches only (bf16 always, as the ratios' base), with the same figures.
  named = decode_e2e.capacity(cfg, weights_bytes=0,
                              memory_bytes=decode_e2e.RESERVE_BYTES + 2**30, contexts=(4096,),
                              names=["tq3.5"])
  assert list(named["caches"]) == ["bf16", "tq3.5"]
  assert named["caches"]["tq3.5"] == cap["caches"]["tq3.5"]


def test_decode_e2e_local_layers_keep_a_ring():
  """With sliding-window layers, only the global layers grow with the context; the
  rings' fixed size is counted per sequence (checked against the memory reports)."""
  import jax.numpy as jnp
  from benchmarks import decode_e2e
  from models.config import DecoderConfig
  cfg = DecoderConfig(vocab_size=64, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=64, ffn_dim=128, sliding_window=32, global_every=3)
  assert [cfg.layer_window(i) for i in range(3)] == [32, 32, None]
  for name, make in _buildable(decode_e2e, 64).items():
    per_token, per_sequence, per_model = decode_e2e.cache_cost(cfg, make, probe_len=256)
    layered = decode_e2e.layer_caches(cfg, make)
    caches = [layered(3, 512, 2, 64, jnp.bfloat16, layer=i) for i in range(3)]
    assert [type(c).__name__ for c in caches][:2] == ["RingKVCache"] * 2
    total = sum(c.memory_report()["total"] for c in caches)
    assert 3 * (per_token * 512 + per_sequence) + per_model == total, name
  dense_per_token = decode_e2e.cache_cost(cfg, decode_e2e.CACHES["bf16"])[0]
  assert dense_per_token == 1 * 2 * 2 * 64 * 2  # the global layer only


def test_chained_timing_makes_every_call():
  """The chain traces `iters` calls into one jitted function and returns a time per call."""
  import jax.numpy as jnp

  traced = []

  def f(q, big):
    traced.append(1)
    return jnp.tanh(q) * big.sum()

  q, big = jnp.ones((8,)), jnp.arange(16.0)
  sec = common.device_time_chained(f, (q, big), small_arg=0, iters=5, calls=2, repeats=3,
                                   warmup=1)
  assert sec > 0 and len(traced) == 5


def test_step_profile_groups_kernels_by_family():
  from benchmarks import step_profile
  assert step_profile.kernel_group("loop_select_fusion_12") == "loop_select_fusion"
  assert step_profile.kernel_group("gemm_fusion_dot_3_1") == "gemm_fusion_dot"
  assert step_profile.kernel_group("void cudnn::fusion::k<int, 4>(float*)") == "void cudnn::fusion::k"
  got = step_profile.summarize([("a_fusion_1", 2.0), ("b", 5.0), ("a_fusion_2", 1.5)])
  assert got["kernels"] == 3 and got["total_us"] == 8.5
  assert got["groups"] == [{"kernel": "b", "launches": 1, "us": 5.0},
                           {"kernel": "a_fusion", "launches": 2, "us": 3.5}]


def test_kernel_sweep_options_are_whole_splits():
  """ctas_per_sm and splits_x become a number of splits of whole tile steps (the kernel's
  own rule for the CTAs), or an error, never a silently different setting; `--splits`
  entries give the count (and overlap_values) themselves."""
  from benchmarks import kernel_sweep
  from turboquant_jax import kernel_attention as ka
  cache = kernel_sweep.TurboQuantKVCache.create(8, 4096, 3, 64, config=kernel_sweep.CONFIG)
  steps = 4096 // cache.key_codes[0].layout.tokens
  assert kernel_sweep.kernel_options(dict(max_concurrent_steps=3), cache, 8, 3) == dict(
      max_concurrent_steps=3)
  for ctas in (2, 4, 6):
    got = kernel_sweep.kernel_options(dict(ctas_per_sm=ctas), cache, 8, 3)
    assert got == dict(num_splits=ka._mosaic_splits(steps, 24, ctas_per_sm=ctas))
  half = kernel_sweep.kernel_options(dict(splits_x=0.5), cache, 8, 3)["num_splits"]
  assert half == ka._mosaic_splits(steps, 24, ctas_per_sm=3) // 2 and 1 <= half <= steps
  with pytest.raises(ValueError, match="do not fit"):
    kernel_sweep.kernel_options(dict(splits_x=64), cache, 8, 3)
  assert kernel_sweep.split_setting("12") == dict(num_splits=12)
  assert kernel_sweep.split_setting("5t") == dict(num_splits=5, overlap_values=True)
  assert kernel_sweep.split_setting("6f") == dict(num_splits=6, overlap_values=False)


def test_step_timeline_splits_span_into_kernels_and_gaps():
  """Overlapping kernels count once; each gap is charged to the kernel that ends it."""
  from benchmarks import step_profile
  rows = [("k_b_2", 12.0, 3.0), ("k_a_1", 0.0, 4.0), ("k_c", 2.0, 3.0),  # busy 0-5
          ("k_b_1", 7.0, 1.0), ("k_a_2", 20.0, 2.0)]
  got = step_profile.idle_split(rows, steps=2)
  assert got["span_us_per_step"] == 11.0               # 0 .. 22
  assert got["busy_us_per_step"] == (5 + 1 + 3 + 2) / 2
  assert got["idle_us_per_step"] == (2 + 4 + 5) / 2
  assert got["idle_before"] == [{"kernel": "k_b", "us_per_step": 3.0},
                                {"kernel": "k_a", "us_per_step": 2.5}]
  assert got["kernels_per_step"] == 2.5
  assert got["largest_gaps"][:2] == [{"us": 5.0, "after": "k_b_2", "before": "k_a_2"},
                                     {"us": 4.0, "after": "k_b_1", "before": "k_b_2"}]


def test_loop_variants_and_same_tokens_group_a_caches_runs():
  from benchmarks import decode_e2e, step_profile
  assert decode_e2e.loop_variant("tq3") == (
      "tq3", {"graphs": True, "defer_appends": True, "flush": "cond"})
  assert decode_e2e.loop_variant("tq3@layerconds@nographs") == (
      "tq3", {"graphs": False, "defer_appends": False, "flush": "cond"})
  assert decode_e2e.loop_variant("tq3@noflush")[1]["flush"] == "none"
  with pytest.raises(ValueError, match="unknown cache"):
    decode_e2e.loop_variant("tq3@graphs")
  runs = {"tq3 graphs on": {"tokens": [[1, 2]]}, "tq3@layerconds graphs on": {"tokens": [[1, 2]]},
          "tq3 graphs off": {"tokens": [[1, 2]]}, "bf16 graphs on": {"tokens": [[3, 4]]},
          "tq3-int8 graphs on": {"tokens": [[1, 2]]},
          "tq3-int8@layerconds graphs on": {"tokens": [[1, 5]]}}
  assert step_profile.same_tokens(runs) == {"tq3": True, "tq3-int8": False}


def test_paired_steps_times_every_cache_in_each_round():
  """The alternating A/B of decode steps: every cache decodes every round (a call alone,
  then `queue` calls queued), the ratios are against the first cache (1 for itself), and
  the caches are not overflowed."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from benchmarks import decode_e2e
  from models.config import DecoderConfig
  from models.decoder import Decoder
  cfg = DecoderConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=64, ffn_dim=128)
  model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  out = decode_e2e.paired_steps(model, cfg, ["bf16", "tq3"], 2, 256, jax.random.PRNGKey(0),
                                rounds=3, steps=4, queue=2)
  assert list(out) == ["bf16", "tq3"]
  for r in out.values():
    assert len(r["step_ms_samples"]) == 3 and r["no_overflow"] and r["tokens_per_s"] > 0
    assert len(r["queued_step_ms_samples"]) == 3 and r["queued_calls"] == 2
    assert 0 < r["dispatch_ms"] < 2 * 4 * r["queued_step_ms"]
  assert [decode_e2e.warm_start(n) for n in (127, 254, 255, 300)] == [127, 127, 255, 255]
  assert decode_e2e.warm_start(600, 256) == 511    # one short of a 128-token block too
  with pytest.raises(ValueError, match="one short"):
    decode_e2e.warm_start(100)
  for prefix in ("", "queued_"):
    assert out["bf16"][f"{prefix}x_bf16_median"] == 1.0
    lo, hi = out["tq3"][f"{prefix}x_bf16_range"]
    assert lo <= out["tq3"][f"{prefix}x_bf16_median"] <= hi


def test_print_table_aligns_columns_and_takes_no_rows(capsys):
  common.print_table([{"a": 1.23456, "bb": "x"}, {"a": 10, "bb": "longer"}], ["a", "bb"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split() == ["a", "bb"] and lines[1].split() == ["1.235", "x"]
  assert len({line.index("bb") for line in lines[:1]} | {line.index("x") for line in
                                                           lines[1:2]}) == 1
  common.print_table([], ["batch", "ms"])     # a --check-only run times nothing
  assert capsys.readouterr().out.split() == ["batch", "ms"]


def test_quality_texts_compares_each_text_with_its_own_fp32():
  from benchmarks import quality_texts
  def result(text, fp32, **methods):
    return {"text": text, "perplexity": {"dense fp32": {"mean": fp32},
                                         **{m: {"mean": v} for m, v in methods.items()}}}
  a = result("/x/GPL-3", 10.0, tq=10.1, kivi=10.0)
  b = result("/y/usr_03.txt lines 5:9", 20.0, tq=20.6)
  assert quality_texts.text_name(a) == "GPL-3"
  assert quality_texts.text_name(b) == "usr_03.txt 5:9"
  per_text = {quality_texts.text_name(r): quality_texts.deltas(r) for r in (a, b)}
  rows = quality_texts.across_texts(per_text)
  assert [r["method"] for r in rows] == ["tq"]          # kivi is on one text only
  assert np.isclose(rows[0]["per_text"]["GPL-3"], 1.0)
  assert np.isclose(rows[0]["worst"], 3.0) and np.isclose(rows[0]["mean"], 2.0)
  assert quality_texts.deltas({"text": "t", "perplexity": {"tq": {"mean": 1.0}}}) == {}


def test_quality_texts_pareto_front_and_stored_bits():
  from benchmarks import quality_texts
  points = {"a": (3.0, 2.0), "b": (3.5, 1.0), "c": (3.5, 1.5), "d": (4.0, 1.0),
            "e": (5.0, 0.1), "f": (2.0, 2.0), "g": (2.0, 2.0)}
  # c is beaten by b (same bits, lower loss), d by b (fewer bits, same loss), a by f;
  # f and g tie on both and stay.
  assert quality_texts.pareto_front(points) == ["f", "g", "b", "e"]
  ring = {"stored_bits_per_coordinate": 0.6, "stored_bits_per_coordinate_at_tokens": 3.2}
  result = {"perplexity": {"ring": ring, "tq": {"stored_bits_per_coordinate": 3.5},
                           "old": {"mean": 1.0}}}
  assert quality_texts.method_bits(result) == {"ring": 3.2, "tq": 3.5}
  model = {"methods": [{"method": "ring", "texts": 3, "worst": 0.5},
                       {"method": "tq", "texts": 2, "worst": 0.1},
                       {"method": "old", "texts": 4, "worst": 0.2}],
           "stored_bits": {"ring": 3.2, "tq": 3.5, "old": None}}
  assert quality_texts.pareto_points(model) == {"ring": (3.2, 0.5)}   # >= 3 texts, bits
  assert quality_texts.family("int4 KIVI-style").startswith("integer")
  assert quality_texts.family("turboquant ring budget 3.5") == "TurboQuant ring budget"
  assert quality_texts.family("turboquant K3/V3.5 rope-centred") == "TurboQuant K/V split"
  assert all(quality_texts.family(m) in quality_texts.FAMILIES
             for m in ("turboquant 3.5", "turboquant budget 3.0 fp8 norms"))


def test_checked_reports_every_case_and_its_errors():
  from benchmarks import common

  def check(x, scale=1):
    if x < 0:
      raise ValueError("negative")
    return dict(x=x * scale, ok=True)

  rows = []
  assert common.checked(rows, check, 2, scale=3) == dict(x=6, ok=True)
  failed = common.checked(rows, check, -1, error_fields=dict(x=-1))
  assert failed["ok"] is False and failed["x"] == -1 and "negative" in failed["error"]
  assert rows == [dict(x=6, ok=True), failed]


def test_quality_norms_log_grid_is_256_codes_within_half_a_step():
  import jax.numpy as jnp

  from benchmarks import quality_norms as qn
  norms = jnp.asarray([0.0, 2.0**-9, 0.37, 1.0, 5.5, 123.4, 300.0, jnp.nan], jnp.float32)
  got = np.asarray(qn.log_grid_norms(norms, jnp.float16), np.float64)
  assert got[0] == 0 and np.isnan(got[-1])
  codes = (np.log2(got[1:-1]) - qn.LOG_LO) * qn.LOG_STEPS
  np.testing.assert_allclose(codes, np.round(codes), atol=0.02)   # on the grid (fp16)
  assert codes.min() >= 0 and codes.max() <= 255                # 8 bits, saturating
  inside = np.asarray(norms[2:6], np.float64)
  half_step = 2 ** (0.5 / qn.LOG_STEPS) - 1
  assert np.all(np.abs(got[2:6] / inside - 1) <= half_step + 1e-3)
  # float8_e4m3fn norms are untouched (the probe changes float16 storage only).
  f8 = qn.log_grid_norms(norms[2:6], jnp.float8_e4m3fn)
  assert f8.dtype == jnp.float8_e4m3fn
  with pytest.raises(ValueError, match="smollm2"):
    qn.main(["uniform", "--model", "gemma3", "--out", "/tmp/x"])
  with pytest.raises(ValueError, match="probe must be"):
    qn.main(["values", "--model", "smollm2", "--out", "/tmp/x"])


def test_quality_norms_kv_probe_stores_only_value_norms_in_8_bits():
  import jax.numpy as jnp

  from benchmarks import quality
  from benchmarks import quality_norms as qn
  dtypes = lambda c: ({g.norm_dtype for g in c.key_quantizer.groups},  # noqa: E731
                      {g.norm_dtype for g in c.value_quantizer.groups})
  (method,) = [m for m in quality.methods() if m.name == qn.KV_METHOD]
  for seed in range(2):   # every cache the row makes, not only the first
    cache = method.make(seed)(1, 64, 2, 64, jnp.float32, layer=seed)
    assert dtypes(cache) == ({jnp.float16}, {jnp.float8_e4m3fn})
    assert cache.config.window == 64 and cache.config.center_keys == "rope"   # 256, capped


def test_quality_norms_budget_kv_stores_float16_key_norms():
  """The budget-kv probe: the float8 budget's widths with float16 key norms, a config the
  cache takes (no patch), its stored bits counting both key norms of a fractional width."""
  import jax.numpy as jnp

  from benchmarks import quality_norms as qn
  method = qn.budget_method(key_norms_16=True)
  caches = method.make(0)(1, 256, 3, 64, jnp.float32, layer=0)
  assert {g.norm_dtype for g in caches.key_quantizer.groups} == {jnp.float16}
  assert {g.norm_dtype for g in caches.value_quantizer.groups} == {jnp.float8_e4m3fn}
  assert 3.5 < method.bits < 3.61


def test_paired_grid_keeps_the_newest_run_of_each_point_and_cache(tmp_path):
  from benchmarks import paired_grid

  def run(name, date, points):
    path = tmp_path / name
    path.write_text(json.dumps({"environment": {"date": date}, "points": {
        key: {"bf16": {"x_bf16_median": 1.0, "tokens_per_s": 100.0},
              **{c: {"x_bf16_median": x, "x_bf16_range": [x - 0.1, x + 0.1],
                     "tokens_per_s": 100.0 * x} for c, x in caches.items()}}
        for key, caches in points.items()}}))
    return path

  old = run("a.json", "2026-12-01T00:00", {"llama 8x32768": {"tq": 1.4, "other": 9.0},
                                           "llama 1x4096": {"tq": 0.9}})
  new = run("b.json", "2026-12-02T00:00", {"llama 8x32768": {"tq": 1.5}})
  (tmp_path / "c.json").write_text(json.dumps({"correctness": []}))   # not a paired run
  rows = paired_grid.collect([new, old, tmp_path / "c.json"], ["tq"])
  assert [(r["batch"], r["context"], r["x_bf16"], r["source"]) for r in rows] == [
      (1, 4096, 0.9, "a.json"), (8, 32768, 1.5, "b.json")]
  assert rows[1]["bf16_tokens_per_s"] == 100.0 and rows[1]["range"] == [1.4, 1.6]
