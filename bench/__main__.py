"""Run every benchmark on this machine and write a report: `python -m bench [--out bench-results] [--skip ...]`.

Each benchmark runs in its own process (so thread settings and memory do not leak between them) and prints
JSON; this collects them into OUT/report.md (tables, with the command of each) and PNG plots, and prints the
summary lines for the README's performance section. Every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("throughput", "attention", "indexes", "shm_memory", "distributed", "reindex", "verify", "segments",
              "serve", "s3client", "s3")
GPU_FILES = ("gpu.json", "gpu-stage.json", "gpu-compile.json")
"""Results of `python -m bench.gpu` (run on a CUDA host, copied here), shown in their own section."""


def run(name: str, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", f"bench.{name}", "--json", *extra], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout).strip().splitlines()[-1:] or ["failed"],
                "seconds": round(time.perf_counter() - t0, 1)}
    data = json.loads(result.stdout[result.stdout.index("{"):])
    data["seconds"] = round(time.perf_counter() - t0, 1)
    data["measured_utc"] = f"{datetime.now(UTC):%Y-%m-%d %H:%M}"
    data["cpu"] = cpu_model()
    return data


def cpu_model() -> str:
    """The CPU's model name and widest vector extension (/proc/cpuinfo): hosts of the same size differ in speed."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields.get('model name', 'unknown CPU')}, {vector}"


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    parser.add_argument("--skip", default="", help=f"comma-separated, of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--reuse", action="store_true",
                        help="report skipped benchmarks from OUT/results.json of an earlier run (marked as such)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = {}
    earlier = json.loads((out / "results.json").read_text()) if args.reuse and (out / "results.json").exists() else {}
    for name in BENCHMARKS:
        if name in skip:
            if name in earlier:
                results[name] = {**earlier[name], "reused_from_earlier_run": True}
            continue
        print(f"running bench.{name} ...", file=sys.stderr, flush=True)
        results[name] = run(name, ["--plots", str(out)] if name in ("indexes", "segments", "serve") else [])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    gpu = {name: json.loads((out / name).read_text()) for name in GPU_FILES if (out / name).exists()}
    report, summary = render(results, out, gpu)
    (out / "report.md").write_text(report)
    print(report)
    print("\n## README summary\n" + "\n".join(summary))


def render(results: dict, out: Path, gpu: dict | None = None) -> tuple[str, list[str]]:
    here = cpu_model()
    lines = [f"# embedctl benchmarks, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
             f"Machine: {os.cpu_count()} CPUs ({here}), {platform.machine()}, Python "
             f"{platform.python_version()}. "
             "Every figure below was measured in this run; ratios compare runs made side by side.", ""]
    def where(r: dict) -> str:
        if "cpu" not in r:
            return ", CPU not recorded"
        return f", on {r['cpu']}" if r["cpu"] != here else ""

    reused = [f"{n} ({r.get('measured_utc', 'date not recorded')}{where(r)})"
              for n, r in results.items() if r.get("reused_from_earlier_run")]
    if reused:
        lines[-2] = lines[-2].replace("Every figure below was measured in this run", (
            "Every figure below was measured by this code (`python -m bench`): these in an earlier run "
            f"(`python -m bench --reuse`), finished at {', '.join(reused)} UTC, the rest in this run"))
    summary = []
    t = results.get("throughput")
    if t and "error" not in t:
        lines += ["## Throughput vs sentence-transformers", f"`{t['command']}` ({t['threads']} threads)", "",
                  table(t["rows"], ["corpus", "method", "setting", "texts_per_s"]), ""]
        lines.append(f"Sweep above: one pass each. Ratios below: medians of {next(iter(t['ratios'].values()))['rounds']}"
                     " paired rounds (ST and embedctl back to back, the GEMM rate beside them), range in brackets.")
        for corpus, r in t["ratios"].items():
            c = t["ceiling"][corpus]
            lines.append(f"- {corpus}: embedctl default / ST default **{r['vs_st_default']}** {r['vs_st_default_range']}, "
                         f"/ ST best (batch {r['st_best_batch_size']}) **{r['vs_st_best']}** {r['vs_st_best_range']}; "
                         f"fastest budget in the sweep: {r['best_budget']}; oneDNN linear layers / PyTorch's "
                         f"{r.get('onednn_over_pytorch_linear', '-')} {r.get('onednn_range', '')}; "
                         f"**{c['fraction_of_ceiling']}** "
                         f"{c['fraction_range']} of the {c['gemm_gflops']} GFLOP/s fp32 GEMM ceiling (torch matmul; "
                         f"{c.get('fraction_of_best_gemm', '-')} of the faster of it and oneDNN's "
                         f"{c.get('onednn_gemm_gflops', '-')} GFLOP/s) ({c['model_mflops_per_token']} MFLOP a token), "
                         f"forward / stage wall "
                         f"**{c['forward_over_stage']}**, padding overhead {c['padding_overhead']}, "
                         f"{c['mean_tokens']} tokens a text")
            if "fraction_of_sustained" in c:
                shares = ", ".join(f"{group} {share:.1%}" for group, share in c["time_by_operator"].items())
                lines.append(f"  - {c['fraction_of_sustained']} {c['fraction_of_sustained_range']} of the "
                             f"{c['sustained_gemm_gflops']} GFLOP/s torch matmul sustains replaying this run's own "
                             f"linear-layer GEMMs back to back; CPU time by operator (one profiled pass): {shares}; "
                             f"the linear layers are {c['linear_share_of_flops']:.1%} of the FLOPs")
            summary.append(f"- {corpus}: {r['vs_st_default']}x sentence-transformers' default batch, "
                           f"{r['vs_st_best']}x its best of 32/64/128 (medians of {r['rounds']} paired rounds, "
                           f"{r['vs_st_best_range'][0]}-{r['vs_st_best_range'][1]}); {c['fraction_of_ceiling']} of the "
                           f"GEMM ceiling; forward/stage {c['forward_over_stage']} (`python -m bench.throughput`)")
        _throughput_plot(t, out)
        lines += ["", "![throughput](throughput.png)", ""]
    a = results.get("attention")
    if a and "error" not in a:
        lines += ["## CPU attention by sequence length", f"`{a['command']}` ({a['threads']} threads): the encoder "
                  f"runs plain attention up to {a['short_attention_max_kv']} key positions, SDPA above", "",
                  table(a["rows"], list(a["rows"][0])), ""]
        if a.get("softmax_rows"):
            lines += [f"The softmax alone, (tokens / T) x heads x T x T scores: the encoder writes it out (max, exp, sum, "
                      f"divide) up to {a['narrow_softmax_max']} positions, where PyTorch's kernel runs scalar code", "",
                      table(a["softmax_rows"], list(a["softmax_rows"][0])), ""]
    i = results.get("indexes")
    if i and "error" not in i:
        keys = ["dim", "type", "build_s_per_10k", "bytes", "recall@10_ef16", "recall@10_ef64", "recall@10_ef256",
                "p50_ms_ef64", "p99_ms_ef64", "p50_ms_ef256", "p99_ms_ef256"]
        lines += ["## Indexes", f"`{i['command']}`: {i['rows']} vectors, {i['queries']} queries", "",
                  table(i["indexes"], keys), "", "Retrieval quality (usage example -> its gloss), efSearch 64:", ""]
        qrows = [{"dim": d, **{f"{kind} R@{k}": v[kind][f"recall@{k}"] for kind in ("exact", "hnsw", "hnsw-sqfp16",
                                                                             "hnsw-sq8") for k in (1, 10)}}
                 for d, v in i["quality"].items()]
        lines += [table(qrows, list(qrows[0])), "", "![quality vs dim](quality_vs_dim.png)",
                  "![recall vs ef](recall_vs_ef.png)", ""]
        full = i["indexes"][0]
        summary.append(f"- HNSW at {full['dim']}d: recall@10 vs exact {full['recall@10_ef64']} at efSearch 64, "
                       f"p50 {full['p50_ms_ef64']} ms; sq8 files {round(i['indexes'][2]['bytes'] / full['bytes'], 2)}"
                       f" of flat (`python -m bench.indexes`)")
    for name, title in (("shm_memory", "Shared-memory weights"), ("distributed", "Distributed vs embedded"),
                        ("reindex", "Re-indexing")):
        r = results.get(name)
        if not r:
            continue
        if "error" in r:
            lines += [f"## {title}", f"not measured: {r['error']}", ""]
            continue
        lines += [f"## {title}", f"`{r['command']}`", "", "```json", json.dumps(
            {k: v for k, v in r.items() if k not in ("command",)}, indent=1), "```", ""]
        if name == "shm_memory":
            k4 = r["rows"][-1]
            summary.append(f"- shared weights, K={k4['k']}: PSS ratio {k4['pss_ratio']}, time to first embedding "
                           f"ratio {k4['time_ratio']} (`python -m bench.shm_memory`)")
        elif name == "distributed":
            summary.append(f"- distributed / embedded texts/s: {r['ratio']} (`python -m bench.distributed`)")
        else:
            fresh = r.get("against_fresh_build", {})
            summary.append(f"- re-index unchanged / full {r['unchanged_over_full']}, 1% changed / full "
                           f"{r['changed_over_full']}; against a fresh build: {fresh.get('lost', '-')} ids lost, "
                           f"{fresh.get('duplicated', '-')} duplicated, same top 10 in "
                           f"{fresh.get('same_top10_share', {}).get('hnsw', '-')} of queries "
                           f"(`python -m bench.reindex`)")
    g = results.get("segments")
    if g and "error" not in g:
        seg_lines, seg_summary = render_segments(g)
        lines += seg_lines
        summary += seg_summary
    v = results.get("verify")
    if v and "error" not in v:
        lines += render_verify(v)
        x = v["index"]
        summary.append(f"- checksums: {x['checksum_share_of_run']:.2%} of an index run of {x['rows']} rows; "
                       f"`embedctl verify` {v['verify']['command_wall_seconds']} s; `embedctl query` checked / "
                       f"--no-verify {v['query']['ratio']} (`python -m bench.verify`)")
    s = results.get("serve")
    if s and "error" not in s:
        from bench.serve import render as render_serve

        lines += ["## Serving", f"`{s['command']}`", "", *render_serve(s).splitlines()[1:], "",
                  "![QPS and p99 by concurrency](serve.png)", ""]
        t, m = s.get("throughput", {}), s.get("memory", {})
        for peer, r in t.get(f"at_concurrency_{max(t.get('levels', [0]))}", {}).items():
            summary.append(f"- serve at concurrency {max(t['levels'])}: {r['qps_ratio']}x {peer}'s requests/s, p99 "
                           f"ratio {r['p99_ratio']} (`python -m bench.serve`)")
        if m:
            summary.append(f"- serve, {m['workers']} workers of the 4B width: PSS attached / loaded {m['pss_ratio']}; "
                           f"start to first answer {m['first_answer_ratio']}, model load {m['worker_load_ratio']} "
                           "(`python -m bench.serve`)")
    o = results.get("s3")
    if o and "error" not in o:
        lines += render_s3(o, results.get("s3client"))
        summary.append(f"- S3 output: index local / S3 time {o['local_over_s3']}; 1% re-index bytes up / full "
                       + ", ".join(f"{r['bytes_up_over_full']} ({name})" for name, r in o["reindex"].items())
                       + f"; query S3 / local cold {o['cold_over_local']}, warm {o['warm_over_local']} "
                       "(`python -m bench.s3`)")
    if gpu:
        gpu_lines, gpu_summary = render_gpu(gpu)
        lines += gpu_lines
        summary += gpu_summary
    for name, r in results.items():
        if "error" in r:
            summary.append(f"- {name}: not measured ({r['error']})")
    return "\n".join(lines), summary


def render_segments(g: dict) -> tuple[list[str], list[str]]:
    """The section of `python -m bench.segments`."""
    lines, summary = ["## Segments", f"`{g['command']}` ({g['cpus']} CPUs)", ""], []
    if "choose" in g:
        c = g["choose"]
        lines += [f"Segment size ({c['vectors']} MiniLM vectors of {c['dim']} dims, HNSW M=32, efConstruction 200; "
                  "search: one query over all segments, efSearch 64):", "",
                  table(c["rows"], ["segment_rows", "segments", "build_s_per_1k_rows", "search_p50_ms"]), ""]
    if "deleted" in g:
        d = g["deleted"]
        rows = [{"dim": dim, "recall 1 segment": d["single_segment"]["dims"][dim]["recall@10_vs_exact"],
                 "recall 5 segments, 10% deleted": d["five_segments"]["dims"][dim]["recall@10_vs_exact"],
                 "search p50 ratio": d["p50_ratio_five_over_single"][dim]["search_p50"],
                 "query p50 ratio (with lookup)": d["p50_ratio_five_over_single"][dim]["query_p50"]}
                for dim in d["single_segment"]["dims"]]
        lines += [f"Five segments with 10% of their rows deleted vs one segment of the same {d['rows'] * 9 // 10} "
                  f"rows ({d['queries']} queries; recall@10 vs exact search at the default efSearch; p50 of the "
                  "index search, and of the whole search with the id and text lookup):", "",
                  table(rows, list(rows[0])), "", "![recall by dim](segments_recall.png)", ""]
        worst = min(r["recall 5 segments, 10% deleted"] for r in rows)
        ratio = max(r["query p50 ratio (with lookup)"] for r in rows)
        summary.append(f"- 5 segments, 10% deleted: recall@10 vs exact >= {worst} at every dim, query p50 "
                       f"{ratio}x one segment's (`python -m bench.segments`)")
    if "nightly" in g:
        n = g["nightly"]
        lines += [f"{n['nights']} nightly runs, each changing 1% of {n['rows']} texts: a run takes a median "
                  f"{n['median_night_over_full']} (at most {n['max_night_over_full']}) of the first, full one "
                  f"({n['full_seconds']} s); at most {n['max_segments']} segments and {n['max_deleted_share']:.1%} "
                  f"deleted rows; recall@10 vs exact never below {n['min_recall@10']}.", "",
                  table([{k: (v if not isinstance(v, dict) else min(v.values())) for k, v in r.items()}
                         for r in n["runs"]], ["night", "seconds", "segments", "segments_built", "rows_embedded",
                                               "rows_rewritten", "deleted_share", "recall@10"]), "",
                  "![nightly runs](segments_nightly.png)", ""]
        summary.append(f"- {n['nights']} nights of 1% changes: median run {n['median_night_over_full']} of a full "
                       f"index, <= {n['max_segments']} segments, <= {n['max_deleted_share']:.1%} deleted, recall@10 "
                       f">= {n['min_recall@10']} (`python -m bench.segments`)")
    if "scaling" in g:
        x = g["scaling"]
        lines += [f"Build stage on Celery ({x['rows']} rows, {x['segments']} segments, {x['pieces']} pieces, chunks "
                  f"embedded beforehand): one single-thread worker process vs two, seconds per run "
                  f"{x['build_seconds']}: **{x['speedup_two_processes']}x**.", ""]
        summary.append(f"- build stage, 2 worker processes / 1: {x['speedup_two_processes']}x "
                       "(`python -m bench.segments`)")
    if "memory" in g:
        m = g["memory"]
        lines += [(f"`{m['command']}`, {m['measured_utc']} UTC: " if "command" in m else "") +
                  f"one build task (a segment of {m['rows']} rows, {m['dim']} dims, `hnsw`): peak RSS grew "
                  f"{m['measured_bytes_per_row']} bytes a row; documented {m['documented_bytes_per_row']}: "
                  f"**{m['measured_over_documented']}** of it (goal: at most 1.5).", ""]
        summary.append(f"- build task memory: {m['measured_over_documented']} of the documented bytes per row "
                       "(`python -m bench.segments`)")
    return lines, summary


def render_verify(v: dict) -> list[str]:
    """The section of `python -m bench.verify`: what checksums cost."""
    h, x, c, r, q = v["hash_gib_per_s"], v["index"], v["verify"], v["reader"], v["query"]
    speeds = ", ".join(f"{k.replace('_', ' ')} {val}" for k, val in h.items())
    return ["## Verified state (checksums)", f"`{v['command']}` ({v['cpus']} CPUs, {v['corpus']})", "",
            f"- Hash speed, GiB/s in memory: {speeds}. embedctl uses XXH3-128.",
            f"- `embedctl index` of {x['rows']} rows: {x['checksum_seconds']} s in checksums ({x['checksum_calls']} "
            f"files, {x['checksum_mib']} MiB: writing them, and checking every chunk before the build) of a "
            f"{x['run_seconds']} s run: **{x['checksum_share_of_run']:.2%}** (goal: at most 2%).",
            f"- `{c['command']}` on the healthy index ({c['files']} version files, {c['chunks']} chunks, {c['mib']} "
            f"MiB): {c['check_seconds']} s of checking, {c['command_wall_seconds']} s for the whole command.",
            f"- Opening the index and loading its {r['index_mib']} MiB of files as a query does (medians of "
            f"{r['rounds']} alternated rounds): {r['load_seconds_checked']} s checked, {r['load_seconds_unchecked']} s "
            f"with --no-verify ({r['check_share_of_load']:.0%} of the load is the check); the whole `embedctl query` "
            f"command: {q['wall_seconds_checked']} s vs {q['wall_seconds_no_verify']} s (ratio **{q['ratio']}**).", ""]


def render_s3(o: dict, client: dict | None) -> list[str]:
    """The object storage section: `python -m bench.s3`, and the client comparison of `python -m bench.s3client`."""
    from bench.s3 import render
    from bench.s3client import render as render_client

    lines = ["## Object storage (S3)",
             f"Measured {o.get('measured_utc', '(date not recorded)')} UTC. The S3 server is SeaweedFS (`weed mini`) "
             "on loopback, on the same 2 shared cores as `embedctl`: no network latency or bandwidth limit, so "
             "these ratios show the client's own cost, not a real link's. Other work shared those cores during "
             "the runs, so single times vary (see the rounds); the ratios are of medians of alternated runs. The "
             "local query reads files that are in the page cache (the local side is warm).", "", render(o), ""]
    for name, r in o["reindex"].items():
        where, g = next(iter(r["written"]["groups"].items()))
        big = g["largest"][0]
        lines.append(f"- Where the 1% {name} re-index's bytes went: `{where}` {g['bytes'] / r['written']['bytes']:.1%} "
                     f"of them ({g['objects']} objects; the largest `{big['key']}`, {big['bytes']:,} bytes), while "
                     f"it embedded {r['rows_embedded']} rows.")
    lines += ["- Why the chunks dominate: a changed corpus has a new plan id (`pipeline/plan.py`: it covers the corpus "
              "fingerprint), so the re-index writes every chunk of its corpus again under `work/<new plan>/chunks/`: "
              "the vectors come from the embedding cache, but all of them are uploaded (2 bytes a value, with their rows), "
              "chunks whose rows did not change included (in the appended case the first chunk is unchanged). The "
              "new segment (only the changed rows) and the version files are small. To reach the goal a re-index "
              "would have to upload only the changed rows' vectors (or point at the earlier plan's unchanged chunks, "
              "which helps the appended pattern but not edits spread over every chunk).", ""]
    if client and "error" not in client:
        lines += [f"Clients, side by side against the same server: `{client['command']}` (ms a request; MiB/s; "
                  "`forked_child_works`: a child forked after the parent used the client can still use a new one)",
                  "", render_client(client), "",
                  "obstore is faster on small requests, but a child forked after its parent used it hangs on its "
                  "first request; Celery's prefork pool and `serve`'s workers are forked, so `pipeline/s3.py` uses "
                  "boto3. (`bench.s3client` needs `pip install obstore`, which is not among embedctl's "
                  "dependencies.)", ""]
    return lines


def render_gpu(gpu: dict) -> tuple[list[str], list[str]]:
    """The section of the `python -m bench.gpu` results stored beside the report (they come from a GPU host)."""
    lines, summary = ["## GPU (stored results of `python -m bench.gpu`)"], []
    sweep, stage, comp = gpu.get("gpu.json"), gpu.get("gpu-stage.json"), gpu.get("gpu-compile.json")
    first = sweep or stage or comp
    lines += [f"Measured on {first['device']} (torch {first['torch']}), not on this machine: the files "
              f"{', '.join(gpu)} beside this report. Model: Qwen3-Embedding-4B's shape with random bf16 weights "
              f"({first['layers']} layers).", ""]
    if sweep:
        lines += [f"`{sweep['command']}`", "", table(sweep["rows"], ["corpus", "method", "setting", "texts_per_s",
                                                                    "activation_peak_mib", "cos_vs_st_min"]), ""]
        from embedctl.pipeline.defaults import DEFAULT_BATCH_TOKENS_CUDA as default

        lines.append(f"The budget that runs fastest here set the CUDA default ({default} tokens); ratios at it, and "
                     "the fraction of the bf16 GEMM ceiling by budget (ST's vectors are normalised in bf16, so "
                     "cosines can pass 1 by rounding):")
        for corpus in sweep["ratios"]:
            c = sweep["ceiling"][corpus]
            rate = {x["setting"]: x["texts_per_s"] for x in sweep["rows"] if x["corpus"] == corpus}
            ours = next(v for k, v in rate.items() if k.startswith(f"batch_tokens={default}"))
            st_default = rate["batch_size=32"]
            st_best = max(v for k, v in rate.items() if k.startswith("batch_size="))
            fractions = {k.removeprefix("fraction_at_"): v for k, v in c.items() if k.startswith("fraction_at_")}
            lines.append(f"- {corpus}: / ST default **{ours / st_default:.3f}**, / ST best **{ours / st_best:.3f}**; "
                         f"fraction of the {c['gemm_tflops']} TFLOP/s ceiling by budget {fractions}; "
                         f"{c['model_gflops_per_token']} GFLOP a token, {c['mean_tokens']} tokens a text")
            summary.append(f"- GPU {corpus}: {ours / st_default:.2f}x sentence-transformers' default batch, "
                           f"{ours / st_best:.2f}x its best of 32-256; {fractions[str(default)]} of the bf16 GEMM "
                           f"ceiling (`python -m bench.gpu`, {sweep['device']})")
        lines.append("")
    if stage:
        s = stage["stage"]
        lines += [f"`{stage['command']}`: embedding stage of `run_embedded` on {s['rows']} glosses "
                  f"({s['chunks']} chunks)", "", table(s["runs"], list(s["runs"][0])), "",
                  f"- reading and tokenising ahead, writing behind (overlap) vs one step at a time: "
                  f"**{s['overlap_speedup']}x**; forward / stage wall {s['overlap']['forward_over_stage']} vs "
                  f"{s['serial']['forward_over_stage']}", ""]
        summary.append(f"- GPU embedding stage: overlap {s['overlap_speedup']}x serial, forward/stage "
                       f"{s['overlap']['forward_over_stage']} (`python -m bench.gpu --parts stage`)")
    if comp:
        c = comp["compile"]
        lines += [f"`{comp['command']}`: `--compile` (torch.compile) vs eager at batch_tokens={c['batch_tokens']}; "
                  f"the first call took {c['first_call_s']} s (compilation)", "",
                  table([{"corpus": k, **v} for k, v in c.items() if isinstance(v, dict)],
                        ["corpus", "eager_texts_per_s", "compiled_texts_per_s", "speedup", "cos_min_vs_eager"]), ""]
        summary.append(f"- GPU `--compile`: {c['glosses']['speedup']}x on glosses, {c['long']['speedup']}x on long "
                       f"texts after {c['first_call_s']} s of compiling (`python -m bench.gpu --parts compile`)")
    return lines, summary


def _throughput_plot(t: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(t["ratios"]), figsize=(10, 3.8))
    for ax, corpus in zip(axes, t["ratios"], strict=True):
        rows = [r for r in t["rows"] if r["corpus"] == corpus]
        labels = [("ST " if r["method"] != "embedctl" else "") + r["setting"].replace("batch_", "") for r in rows]
        ax.barh(labels, [r["texts_per_s"] for r in rows],
                color=["#999999" if r["method"] != "embedctl" else "#2a6fdb" for r in rows])
        ax.set_title(f"{corpus}: texts/s")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
