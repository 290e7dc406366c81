"""Turn one run's raw measurements into bench/results/latest.{json,md,png}.

Every derived figure is computed here, from the load generator's counts and
/proc readings, so latest.json (raw and derived) and latest.md always agree.
Ratios compare durable-chat with baselines measured in the same run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

NAMES = {
    "durable": "durable-chat",
    "socketio": "python-socketio + AsyncRedisManager",
    "node": "Socket.IO on Node + @socket.io/redis-adapter",
    "broadcaster": "broadcaster (Redis) + Starlette",
    "bare": "bare uvicorn WS, no Redis (limit)",
}
PEERS = ("socketio", "node", "broadcaster")

IDLE_KEEPALIVE_FIGURES = (
    "keepalive_interval_s", "keepalives_per_socket", "redis_commands_per_s",
    "redis_round_trips_per_s",
)  # fmt: skip

# Targets from the issue: (key, text).
TARGETS = (
    ("peer_ratio", "Deliveries per second at least 3x the best peer's"),
    ("p99", "p99 emit-to-receive under 10 ms with 2,000 listeners on 2 pods"),
    ("redis_limit", "At least 40% of the raw redis-py pub/sub limit"),
    ("round_trips", "At most one Redis round trip per delta batch"),
    ("idle_kb", "Idle socket under 40 KB"),
    ("idle_cpu", "Idle CPU per socket, keep-alive pings included, at most 1.2x broadcaster's"),
    ("storm_exact", "Reconnect storm: nothing lost or doubled on any socket"),
    ("storm_p99", "Reconnect storm: p99 emit-to-receive of pod B's streams under 50 ms"),
    ("full_speed", "Full model speed: deliveries/s at least 1.0x broadcaster's"),
    ("paced_cpu", "Paced fan-out: CPU per delivery at most 0.67x broadcaster's, 1.2x bare's"),
    ("connects", "Connects/s at least 0.7x broadcaster's; pod CPU per connect at most 1.3 ms"),
    ("idle_round_trips", "Idle: at most 1 Redis round trip/s per pod, whatever its sockets"),
    ("bigroom_lag", "Big room: the loop never stalls more than 10 ms (its own CPU clock)"),
    ("bigroom_others", "Big room: other threads' p99 unaffected (at most 1.5x theirs alone)"),
)


# --- derived figures -----------------------------------------------------------


def fanout_figures(r: dict[str, Any]) -> dict[str, Any]:
    """Rates, latency and CPU per 1,000 deliveries of one fanout measurement."""
    if "failed" in r:
        return {"failed": r["failed"]}
    frames = r["counts"]["frames"]
    cpu = sum(r["server_cpu_s"].values())
    lat = r["latency"]
    per = 1000 / frames if frames else 0.0
    return {
        "frames_per_s": r["rates"]["frames_per_s"],
        "deltas_per_s": r["rates"]["deltas_per_s"],
        "tokens_per_s": r["rates"]["tokens_per_s"],
        "turns_per_s": r["rates"]["turns_per_s"],
        "frames_per_turn_per_socket": frames / max(r["counts"]["turns"], 1) / r["listeners"],
        "p50_ms": lat.get("p50_ms"), "p90_ms": lat.get("p90_ms"), "p99_ms": lat.get("p99_ms"),
        "p999_ms": lat.get("p999_ms"), "max_ms": lat.get("max_ms"),
        "latency_samples": lat.get("count", 0),
        "server_cpu_s": cpu, "server_cores": cpu / r["elapsed_s"],
        "server_cpu_s_per_1000": cpu * per,
        "redis_cpu_s_per_1000": r["redis_cpu_s"] * per,
        "loadgen_cores": r["loadgen_cpu_s"] / r["elapsed_s"],
        "sockets": r["sockets"], "errors": r.get("errors", {}),
    }  # fmt: skip


def script_names() -> dict[str, str]:
    """SHA1 -> name of durable-chat's Lua scripts (as EVALSHA names them)."""
    try:
        from app.chat import scripts
    except ImportError:
        return {}
    return {
        hashlib.sha1(value.encode()).hexdigest(): name.lower()
        for name, value in vars(scripts).items()
        if name.isupper() and isinstance(value, str) and "redis.call" in value
    }


def cost_figures(r: dict[str, Any], shas: dict[str, str]) -> dict[str, Any]:
    """Redis commands and round trips per turn and per delta (one cost run)."""
    if "failed" in r:
        return {"failed": r["failed"]}
    counts = r["counts"]
    turns, elapsed = max(counts["turns"], 1), r["elapsed_s"]
    monitor: dict[str, int] = r.get("monitor") or {}
    client: dict[str, int] = {}
    lua = 0
    for key, n in monitor.items():
        source, _, command = key.partition(":")
        if source == "lua":
            lua += n
            continue
        if command.startswith("EVALSHA:"):
            command = "EVALSHA " + shas.get(command[8:], command[8:16])
        client[command] = client.get(command, 0) + n
    # A delta event reaches each of its thread's listeners once: the listeners'
    # count divided by their number is what was published. Deltas ready
    # together go in one APPEND_DELTA call, and those left when a turn ends
    # ride with END_TURN: never more than one call for one delta.
    deltas_published = counts["deltas"] / max(r["listeners"], 1)
    delta_writes = client.get("EVALSHA append_delta", 0)
    round_trips = sum(client.values())
    stats_calls = sum(v for k, v in r["commandstats"].items() if k != "config|resetstat")
    return {
        "pods": r.get("pods"), "listeners": r["listeners"], "threads": r["threads"],
        "turns": counts["turns"], "deltas_published": deltas_published,
        "deltas_per_turn": deltas_published / turns,
        "round_trips_per_turn": round_trips / turns,
        "delta_writes_per_delta": delta_writes / deltas_published if deltas_published else None,
        "lua_internal_per_turn": lua / turns,
        "commandstats_calls_per_turn": stats_calls / turns,
        "redis_cpu_ms_per_turn": 1000 * r["redis_cpu_s"] / turns,
        "frames_per_s": counts["frames"] / elapsed,
        "client_commands_per_turn": {
            k: round(v / turns, 3) for k, v in sorted(client.items(), key=lambda kv: -kv[1])
        },
    }  # fmt: skip


def derive(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "fanout" in results:
        out["fanout"] = {s: fanout_figures(r) for s, r in results["fanout"].items()}
    if "latency" in results:
        out["latency"] = {
            w: {s: fanout_figures(r) for s, r in by.items()} for w, by in results["latency"].items()
        }
    if "heavy" in results:
        out["heavy"] = {s: fanout_figures(r) for s, r in results["heavy"].items()}
    if "cost" in results:
        shas = script_names()
        out["cost"] = [cost_figures(r, shas) for r in results["cost"]]
    if "idle" in results:
        out["idle"] = {}
        for s, r in results["idle"].items():
            if "failed" in r:
                out["idle"][s] = r
                continue
            kb, cpu = r["rss_per_socket_kb"], r["idle_cpu_fraction"]
            out["idle"][s] = {
                **{k: r[k] for k in ("sockets", "held", "connect_per_s", "idle_cpu_fraction")},
                **{
                    k: r.get(k)
                    for k in (
                        "keepalive_interval_s",
                        "keepalives_per_socket",
                        "redis_commands_per_s",
                        "redis_round_trips_per_s",
                    )
                },
                "idle_cpu_pct_per_1000": 100 * cpu * 1000 / r["held"] if r["held"] else None,
                "rss_per_socket_kb": kb,
                # One core, 8 GiB for sockets, idle sockets using at most half the core.
                "sockets_per_8gib": int(8 * 1024 * 1024 / kb) if kb else None,
                "sockets_at_half_core": int(0.5 * r["held"] / cpu) if cpu > 0 else None,
            }
    out["targets"] = targets(results, out)
    return out


def _best_peer(fan: dict[str, Any]) -> tuple[str | None, float]:
    best, rate = None, 0.0
    for s in PEERS:
        f = fan.get(s, {})
        if f.get("tokens_per_s", 0) > rate:
            best, rate = s, f["tokens_per_s"]
    return best, rate


def targets(results: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    fan = d.get("fanout", {})
    ours = fan.get("durable", {})
    peer, rate = _best_peer(fan)
    if peer and ours.get("tokens_per_s"):
        ratio = ours["tokens_per_s"] / rate
        frames_ratio = ours["frames_per_s"] / fan[peer]["frames_per_s"]
        t["peer_ratio"] = {
            "measured": f"{ratio:.2f}x {NAMES[peer]} in tokens/s ({frames_ratio:.2f}x in frames/s)",
            "met": ratio >= 3,
            "bound": _cpu_bound(results, fan, peer),
        }
    lat = d.get("latency", {})
    if lat:
        window = min(lat, key=lambda w: float(w.removeprefix("window_").removesuffix("ms")))
        f = lat[window].get("durable", {})
        if f.get("p99_ms") is not None:
            cfg = results["config"]
            listeners = cfg["latency_threads"] * cfg["latency_listeners"]
            t["p99"] = {
                "measured": f"{f['p99_ms']:.1f} ms ({listeners} listeners, {window})",
                "met": f["p99_ms"] < 10 and listeners >= 2000,
                "bound": f"p50 {f['p50_ms']:.1f} ms; the pods used {f['server_cores']:.2f} "
                f"cores and the load generator {f['loadgen_cores']:.2f} of "
                f"{results['machine']['cpus']}",
            }
    # The higher of the two shapes' rates: the stricter limit.
    limit = max(
        (r.get("deliveries_per_s") or 0 for r in results.get("limits", {}).values()), default=0
    )
    if limit and ours.get("frames_per_s"):
        share = ours["frames_per_s"] / limit
        t["redis_limit"] = {
            "measured": f"{100 * share:.0f}% ({ours['frames_per_s']:,.0f} / {limit:,.0f} "
            "deliveries/s)",
            "met": share >= 0.4,
        }
    costs = [c for c in d.get("cost", []) if c.get("delta_writes_per_delta") is not None]
    if costs:
        worst = max(c["delta_writes_per_delta"] for c in costs)
        t["round_trips"] = {
            "measured": f"{worst:.2f} `APPEND_DELTA` calls per delta (a call writes a batch)",
            "met": worst <= 1.0,
        }
    idle = d.get("idle", {}).get("durable", {})
    if idle.get("rss_per_socket_kb"):
        kb = idle["rss_per_socket_kb"]
        # "40 KB" read as 40 KiB, the unit RSS is reported in.
        t["idle_kb"] = {"measured": f"{kb:.1f} KiB", "met": kb < 40}
    theirs = d.get("idle", {}).get("broadcaster", {})
    if idle.get("idle_cpu_pct_per_1000") and theirs.get("idle_cpu_pct_per_1000"):
        ratio = idle["idle_cpu_pct_per_1000"] / theirs["idle_cpu_pct_per_1000"]
        t["idle_cpu"] = {
            "measured": f"{ratio:.2f}x: {idle['idle_cpu_pct_per_1000']:.3f}% of a core per "
            f"1,000 sockets ({idle['held']:,} sockets) vs {theirs['idle_cpu_pct_per_1000']:.3f}% "
            f"({theirs['held']:,})",
            "met": ratio <= 1.2,
            "bound": f"{idle['keepalives_per_socket']:g} keep-alive ping(s) per socket in the "
            f"window, and {idle['redis_commands_per_s']:,.0f} Redis commands/s inside the lease "
            "and presence renewals (broadcaster renews nothing)",
        }
    storm = results.get("storm", {})
    if "resumed" in storm:
        bad = storm["lost"] + storm["doubled"] + storm["behind_at_end"]
        t["storm_exact"] = {
            "measured": f"{storm['resumed']:,} of {storm['sockets']:,} sockets resumed on pod B "
            f"{'(then the run gave up waiting) ' if storm.get('timed_out') else ''}in "
            f"{storm['storm_s']:.1f} s; {storm['events']:,} events checked: {storm['lost']} lost, "
            f"{storm['doubled']} doubled, {storm['behind_at_end']} sockets behind at the end",
            "met": bad == 0 and storm["failed_to_resume"] == 0,
        }
        p99 = storm["latency_storm"].get("p99_ms")
        if p99 is not None:
            lag = (storm.get("pod_b_loop_lag") or {}).get("cpu") or {}
            t["storm_p99"] = {
                "measured": f"{p99:.1f} ms during the {storm['storm_s']:.1f} s storm "
                f"({storm['latency_calm'].get('p99_ms', 0):.1f} ms before it)",
                "met": p99 < 50,
                "bound": f"pod B used {storm['pod_b_cores_in_storm']:.2f} cores and the load "
                f"generator {storm['loadgen_cores_in_storm']:.2f} of "
                f"{results['machine']['cpus']}; pod B's loop stalled up to "
                f"{_n(lag.get('max_ms'))} ms (p99 {_n(lag.get('p99_ms'))} ms) while "
                f"{storm['resumed']:,} sockets joined",
            }
    t.update(_issue18_targets(results, d))
    return t


def _issue18_targets(results: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    """The targets of the fan-out, connect, idle and big-room work."""
    t: dict[str, Any] = {}
    fan = d.get("fanout", {})
    our_rate = fan.get("durable", {}).get("frames_per_s")
    their_rate = fan.get("broadcaster", {}).get("frames_per_s")
    if our_rate and their_rate:
        t["full_speed"] = {
            "measured": f"{our_rate / their_rate:.2f}x ({our_rate:,.0f} vs {their_rate:,.0f} "
            "deliveries/s)",
            "met": our_rate >= their_rate,
            "bound": _cpu_bound(results, fan, "broadcaster"),
        }
    cpu = {s: f.get("server_cpu_s_per_1000") for s, f in d.get("heavy", {}).items()}
    if cpu.get("durable") and cpu.get("broadcaster") and cpu.get("bare"):
        cfg = results["config"]
        vs_b, vs_bare = cpu["durable"] / cpu["broadcaster"], cpu["durable"] / cpu["bare"]
        t["paced_cpu"] = {
            "measured": f"{vs_b:.2f}x broadcaster's, {vs_bare:.2f}x bare's "
            f"({cfg['heavy_threads']} threads x {cfg['heavy_listeners']} listeners, all "
            f"streaming, one token per {cfg['heavy_token_delay_ms']:g} ms)",
            "met": vs_b <= 0.67 and vs_bare <= 1.2,
            "bound": f"server CPU per 1,000 deliveries: {1000 * cpu['durable']:.1f} ms; "
            f"broadcaster's {1000 * cpu['broadcaster']:.1f}, and {1000 * cpu['bare']:.1f} for "
            "bare uvicorn's socket writes with no Redis and no framework: the target, "
            f"{670 * cpu['broadcaster']:.1f} ms, is "
            f"{0.67 * cpu['broadcaster'] / cpu['bare']:.2f}x those writes alone",
        }
    idle = results.get("idle", {})
    ours, theirs = idle.get("durable", {}), idle.get("broadcaster", {})
    if ours.get("connect_per_s") and theirs.get("connect_per_s"):
        ratio, cpu_ms = ours["connect_per_s"] / theirs["connect_per_s"], ours.get("connect_cpu_ms")
        t["connects"] = {
            "measured": f"{ratio:.2f}x ({ours['connect_per_s']:,.0f} vs "
            f"{theirs['connect_per_s']:,.0f}/s); {_n(cpu_ms, 2)} ms of pod CPU per connect",
            "met": ratio >= 0.7 and cpu_ms is not None and cpu_ms <= 1.3,
            "bound": f"broadcaster's server used {_n(theirs.get('connect_cpu_ms'), 2)} ms per "
            f"connect in the same run (the WebSocket upgrade both pay; {ours['sockets']:,} "
            f"sockets here, {theirs['sockets']:,} there)",
        }
    if ours.get("redis_round_trips_per_s") is not None:
        trips = ours["redis_round_trips_per_s"]
        t["idle_round_trips"] = {
            "measured": f"{trips:.2f}/s with {ours['held']:,} idle sockets on as many threads "
            f"({ours['redis_commands_per_s']:,.0f} commands/s run inside the renewal scripts)",
            "met": trips <= 1.0,
        }
    room = results.get("bigroom", {}).get("durable", {})
    alone, beside = room.get("alone", {}), room.get("with_bigroom", {})
    lag = (beside.get("loop_lag") or {}).get("cpu") or {}
    if lag.get("max_ms") is not None:
        t["bigroom_lag"] = {
            "measured": f"p99 <= {lag['p99_ms']:g} ms, max <= {lag['max_ms']:g} ms "
            f"({beside['big_listeners']:,} listeners, {beside['big_deliveries_per_s']:,.0f} "
            "deliveries/s)",
            "met": lag["max_ms"] <= 10,
            "bound": f"the pod used {beside['server_cpu_s'] / beside['elapsed_s']:.2f} cores "
            f"of {results['machine']['cpus']}, which the room's load generator shares",
        }
    p99_alone = alone.get("others", {}).get("p99_ms")
    p99_beside = beside.get("others", {}).get("p99_ms")
    if p99_alone and p99_beside:
        t["bigroom_others"] = {
            "measured": f"{p99_beside:.1f} ms beside the room, {p99_alone:.1f} ms alone",
            "met": p99_beside <= 1.5 * p99_alone,
            "bound": f"one event loop: their frames wait behind the room's "
            f"{beside['big_deliveries_per_s']:,.0f} deliveries/s, handed out in 2 ms slices "
            f"(loop lag p99 {_n(lag.get('p99_ms'))} ms); the pod used "
            f"{beside['server_cpu_s'] / beside['elapsed_s']:.2f} cores",
        }
    return t


def _cpu_bound(results: dict[str, Any], fan: dict[str, Any], peer: str) -> str:
    """Where durable-chat's CPU went at full speed, against ``peer``'s."""
    ours, theirs = fan["durable"], fan[peer]
    redis_cores = ours["redis_cpu_s_per_1000"] * ours["frames_per_s"] / 1000
    busy = ours["server_cores"] + redis_cores + ours["loadgen_cores"]
    return (
        f"CPU: {busy:.2f} of {results['machine']['cpus']} cores busy (pods "
        f"{ours['server_cores']:.2f}, Redis {redis_cores:.2f}, load generator "
        f"{ours['loadgen_cores']:.2f}); per 1,000 deliveries the pods used "
        f"{1000 * ours['server_cpu_s_per_1000']:.0f} ms and Redis "
        f"{1000 * ours['redis_cpu_s_per_1000']:.0f} ms, {NAMES[peer]}'s "
        f"{1000 * theirs['server_cpu_s_per_1000']:.0f} and "
        f"{1000 * theirs['redis_cpu_s_per_1000']:.1f}"
    )


# --- markdown -------------------------------------------------------------------


def _n(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def markdown(results: dict[str, Any], d: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# durable-chat benchmark results",
        "",
        f"Run {m['date']} on {m['cpus']} CPUs ({m['platform']}), Python {m['python']}, "
        f"Redis {m.get('redis', '?')}; {'quick' if results['quick'] else 'full'} run, "
        f"{results.get('wall_s', 0):.0f} s. Command: `python -m bench.run"
        f"{' --quick' if results['quick'] else ''}`. Everything (Redis, servers, load "
        "generator) shares this one machine; see bench/README.md for what each figure means.",
        "",
    ]
    if "fanout" in d:
        lines += _fanout_md(results, d)
    if "latency" in d:
        lines += _latency_md(results, d)
    if "heavy" in d:
        lines += _heavy_md(results, d)
    if "idle" in d:
        lines += _idle_md(results, d)
    if "cost" in d:
        lines += _cost_md(d)
    if "resumed" in results.get("storm", {}):
        lines += _storm_md(results)
    lines += _versus_md(d)
    if "bigroom" in results:
        lines += _bigroom_md(results)
    lines += [
        "## Targets",
        "",
        "A target not met says what bounded it in this run; bench/README.md says more.",
        "",
        "| target | measured | met | what bounds it (this run) |",
        "| --- | --- | --- | --- |",
    ]
    for key, text in TARGETS:
        t = d["targets"].get(key)
        if t is None:
            lines.append(f"| {text} | not measured in this run | - | |")
        elif t["met"]:
            lines.append(f"| {text} | {t['measured']} | yes | |")
        else:
            lines.append(f"| {text} | {t['measured']} | **no** | {t.get('bound', '-')} |")
    lines.append("")
    return "\n".join(lines)


def _versus_md(d: dict[str, Any]) -> list[str]:
    """Every ratio of durable-chat against each peer, from the tables above."""
    fan, idle = d.get("fanout", {}), d.get("idle", {})
    lat = d.get("latency", {})
    paced = lat[min(lat, key=lambda w: float(w[7:-2]))] if lat else {}
    peers = [p for p in (*PEERS, "bare") if p in fan or p in idle or p in paced]
    if "durable" not in (*fan, *idle, *paced) or not peers:
        return []

    def ratio(table: dict[str, Any], key: str, peer: str) -> str:
        return _ratio(table.get("durable", {}).get(key), table.get(peer, {}).get(key))

    lines = [
        "## durable-chat against each peer",
        "",
        "durable-chat's figure over the peer's, from the tables above: above 1x is better for "
        "rates, below 1x for costs and latency.",
        "",
        "| peer | deliveries/s | server CPU / delivery | paced p99 | idle RSS / socket "
        "| connects/s | idle CPU / socket |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in peers:
        lines.append(
            f"| {NAMES[p]} | {ratio(fan, 'frames_per_s', p)} "
            f"| {ratio(fan, 'server_cpu_s_per_1000', p)} | {ratio(paced, 'p99_ms', p)} "
            f"| {ratio(idle, 'rss_per_socket_kb', p)} | {ratio(idle, 'connect_per_s', p)} "
            f"| {ratio(idle, 'idle_cpu_pct_per_1000', p)} |"
        )
    return [*lines, ""]


def _fanout_md(results: dict[str, Any], d: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    fan = d["fanout"]
    ours = fan.get("durable", {})
    lines = [
        "## Fan-out at full model speed",
        "",
        f"{cfg['threads']} threads x {cfg['listeners']} listeners "
        f"({cfg['threads'] * cfg['listeners']} sockets, half on each of 2 server processes), "
        f"every thread running turns back to back; fake model at full speed, "
        f"{cfg['reply_tokens']} stamped tokens a reply, coalesced by 25 ms / 2048 B. "
        f"Measured for {cfg['duration_s']:g} s after {cfg['warmup_s']:g} s of warm-up. "
        "A delivery is one frame received by one client. Latency is emit-to-receive "
        "per token under saturation (it includes queueing; see the paced run below). "
        "Ratio columns: durable-chat's figure over this row's.",
        "",
        "| system | deliveries/s | ratio | deltas/s | tokens/s | ratio | turns/s "
        "| p50 ms | p99 ms | p99.9 ms | server CPU s / 1000 deliveries | ratio (this / ours) "
        "| server cores busy | load-gen cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for s, f in fan.items():
        if "failed" in f:
            lines.append(f"| {NAMES[s]} | failed: {f['failed'][:120]!r} |" + " |" * 12)
            continue
        lines.append(
            f"| {NAMES[s]} | {_n(f['frames_per_s'])} "
            f"| {_ratio(ours.get('frames_per_s'), f['frames_per_s'])} "
            f"| {_n(f['deltas_per_s'])} | {_n(f['tokens_per_s'])} "
            f"| {_ratio(ours.get('tokens_per_s'), f['tokens_per_s'])} | {_n(f['turns_per_s'], 1)} "
            f"| {_n(f['p50_ms'], 1)} | {_n(f['p99_ms'], 1)} | {_n(f['p999_ms'], 1)} "
            f"| {_n(f['server_cpu_s_per_1000'], 3)} "
            f"| {_ratio(f['server_cpu_s_per_1000'], ours.get('server_cpu_s_per_1000'))} "
            f"| {_n(f['server_cores'], 2)} | {_n(f['loadgen_cores'], 2)} |"
        )  # fmt: skip
    limits = results.get("limits", {})
    if limits:
        lines += [
            "",
            "Physical limits of the path, same run (deliveries/s; ratio: durable-chat's over the "
            "limit):",
            "",
            "| limit | deliveries/s | durable-chat / limit | subscriber CPU s / 1000 |",
            "| --- | ---: | ---: | ---: |",
        ]
        for shape, text in (
            ("per_listener", "raw redis-py pub/sub, one subscriber connection per listener "
             f"({cfg['threads'] * cfg['listeners']} connections in 2 processes)"),
            ("hub", "raw redis-py pub/sub, one connection per process subscribed to every "
             "thread (a pod's intake; each message is one delivery)"),
        ):  # fmt: skip
            r = limits.get(shape, {})
            if "deliveries_per_s" in r:
                lines.append(
                    f"| {text} | {_n(r['deliveries_per_s'])} "
                    f"| {_ratio(ours.get('frames_per_s'), r['deliveries_per_s'])} "
                    f"| {_n(r['cpu_s_per_1000'], 3)} |"
                )
        bare = fan.get("bare", {})
        if bare.get("frames_per_s"):
            lines.append(
                f"| bare uvicorn WebSocket broadcast, no Redis | {_n(bare['frames_per_s'])} "
                f"| {_ratio(ours.get('frames_per_s'), bare['frames_per_s'])} "
                f"| {_n(bare['server_cpu_s_per_1000'], 3)} |"
            )
    return [*lines, ""]


def _latency_md(results: dict[str, Any], d: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    listeners = cfg["latency_threads"] * cfg["latency_listeners"]
    offered = cfg["latency_active"] * 1000 / cfg["token_delay_ms"]
    lines = [
        "## Latency at a paced load",
        "",
        f"{listeners} listeners ({cfg['latency_threads']} threads x {cfg['latency_listeners']}, "
        f"half on each of 2 server processes); {cfg['latency_active']} threads streaming at any "
        f"time at one token per {cfg['token_delay_ms']:g} ms ({cfg['latency_tokens']} tokens a "
        f"reply): about {offered:,.0f} tokens/s emitted, {offered * cfg['latency_listeners']:,.0f} "
        "token deliveries/s. Emit-to-receive per token, from the stamp the model put in it to "
        "the client's read. The window is the delta coalescing window (a token waits in it, by "
        "design, up to that long).",
        "",
        "| window | system | tokens/s delivered | deliveries/s | p50 ms | p90 ms | p99 ms "
        "| p99.9 ms | max ms | p99 ratio (this / ours) | server cores busy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for window, by in d["latency"].items():
        ours = by.get("durable", {})
        for s, f in by.items():
            if "failed" in f:
                lines.append(f"| {window} | {NAMES[s]} | failed |" + " |" * 8)
                continue
            lines.append(
                f"| {window.removeprefix('window_')} | {NAMES[s]} | {_n(f['tokens_per_s'])} "
                f"| {_n(f['frames_per_s'])} | {_n(f['p50_ms'], 1)} | {_n(f['p90_ms'], 1)} "
                f"| {_n(f['p99_ms'], 1)} | {_n(f['p999_ms'], 1)} | {_n(f['max_ms'], 1)} "
                f"| {_ratio(f['p99_ms'], ours.get('p99_ms'))} | {_n(f['server_cores'], 2)} |"
            )
    return [*lines, ""]


def _heavy_md(results: dict[str, Any], d: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    ours = d["heavy"].get("durable", {})
    lines = [
        "## Fan-out-heavy at a paced load",
        "",
        f"{cfg['heavy_threads']} threads x {cfg['heavy_listeners']} listeners (half on each of "
        f"2 server processes), every thread streaming at one token per "
        f"{cfg['heavy_token_delay_ms']:g} ms, coalesced by 25 ms / 2048 B: many listeners per "
        "thread, where writing a frame once per pod pays off. Ratio: durable-chat's CPU per "
        "delivery over this row's.",
        "",
        "| system | deliveries/s | p50 ms | p99 ms | server CPU s / 1000 deliveries | ratio "
        "| server cores busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s, f in d["heavy"].items():
        if "failed" in f:
            lines.append(f"| {NAMES[s]} | failed |" + " |" * 5)
            continue
        lines.append(
            f"| {NAMES[s]} | {_n(f['frames_per_s'])} | {_n(f['p50_ms'], 1)} "
            f"| {_n(f['p99_ms'], 1)} | {_n(f['server_cpu_s_per_1000'], 3)} "
            f"| {_ratio(ours.get('server_cpu_s_per_1000'), f['server_cpu_s_per_1000'])} "
            f"| {_n(f['server_cores'], 2)} |"
        )
    return [*lines, ""]


def _idle_md(results: dict[str, Any], d: dict[str, Any]) -> list[str]:
    ours = d["idle"].get("durable", {})
    lines = [
        "## Idle connections on one server process (one core)",
        "",
        "Sockets opened with 100 handshakes in flight, each on its own thread (durable-chat "
        "creates the thread and subscribes the pod to it); RSS growth of the server process "
        "over the sockets held. Then, once every socket has answered the server's first "
        "keep-alive ping (durable-chat also at least 12 s after its last connect: past its "
        "audit's window for fresh follows), the server's CPU use and what it asked of Redis "
        "over one keep-alive interval (each socket pinged once in it): round trips (the "
        "commands it sent, from MONITOR; a script call is one) and the commands Redis ran, "
        "those inside scripts too (INFO commandstats). 'Sockets per 8 "
        "GiB' extrapolates from the RSS. Ratios: durable-chat's figure over this row's.",
        "",
        "| system | sockets held | RSS KiB / socket | ratio | connects/s | ratio "
        "| keep-alive interval s | pings / socket in the window | idle CPU % of a core "
        "| % per 1,000 sockets | ratio | Redis round trips/s idle | Redis commands/s idle "
        "| sockets per 8 GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |",
    ]
    for s, f in d["idle"].items():
        if "failed" in f:
            lines.append(f"| {NAMES[s]} | failed: {f['failed'][:120]!r} |" + " |" * 12)
            continue
        lines.append(
            f"| {NAMES[s]} | {_n(f['held'])} | {_n(_grew(f['rss_per_socket_kb']), 1)} "
            f"| {_ratio(ours.get('rss_per_socket_kb'), _grew(f['rss_per_socket_kb']))} "
            f"| {_n(f['connect_per_s'])} | {_ratio(ours.get('connect_per_s'), f['connect_per_s'])} "
            f"| {_n(f.get('keepalive_interval_s'))} | {_n(f.get('keepalives_per_socket'), 2)} "
            f"| {_n(100 * f['idle_cpu_fraction'], 2)} | {_n(f.get('idle_cpu_pct_per_1000'), 3)} "
            f"| {_ratio(ours.get('idle_cpu_pct_per_1000'), f.get('idle_cpu_pct_per_1000'))} "
            f"| {_n(f.get('redis_round_trips_per_s'), 2)} | {_n(f.get('redis_commands_per_s'), 1)} "
            f"| {_n(_grew(f['sockets_per_8gib']))} |"
        )  # fmt: skip
    if any((f.get("rss_per_socket_kb") or 1) <= 0 for f in d["idle"].values()):
        lines += [
            "",
            "A '-' for RSS: the process's RSS did not grow with the sockets (a garbage "
            "collector, V8's in Node, gave back more of its start-up heap than the sockets took), "
            "so this run says nothing of its memory per socket.",
        ]
    return [*lines, ""]


def _grew(x: float | None) -> float | None:
    """A growth figure, or None when it is not one (zero or negative)."""
    return x if x is not None and x > 0 else None


def _cost_md(d: dict[str, Any]) -> list[str]:
    lines = [
        "## Redis cost per turn and per delta (durable-chat)",
        "",
        "Every command Redis ran during the window, from MONITOR: a command sent by a pod is one "
        "round trip (a Lua script call is one, whatever it does inside); commands run inside "
        "scripts are counted apart. Includes the pods' background work (reaper lease, fan-out "
        "audit), spread over the turns.",
        "",
        "| pods | listeners / thread | turns | deltas / turn | round trips / turn "
        "| APPEND_DELTA calls / delta | in-script commands / turn | commandstats calls / turn "
        "| Redis CPU ms / turn |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in d["cost"]:
        if "failed" in c:
            lines.append("| failed |" + " |" * 8)
            continue
        lines.append(
            f"| {c['pods']} | {c['listeners']} | {c['turns']} | {_n(c['deltas_per_turn'], 2)} "
            f"| {_n(c['round_trips_per_turn'], 2)} | {_n(c['delta_writes_per_delta'], 2)} "
            f"| {_n(c['lua_internal_per_turn'], 1)} | {_n(c['commandstats_calls_per_turn'], 1)} "
            f"| {_n(c['redis_cpu_ms_per_turn'], 3)} |"
        )
    good = [c for c in d["cost"] if "client_commands_per_turn" in c]
    if good:
        c = good[-1]
        lines += [
            "",
            f"Round trips per turn by command ({c['pods']} pods, {c['listeners']} listeners per "
            "thread): " + ", ".join(f"{k} {v:g}" for k, v in c["client_commands_per_turn"].items()),
        ]
    return [*lines, ""]


def _storm_md(results: dict[str, Any]) -> list[str]:
    r = results["storm"]
    off = r["offline"]
    lines = [
        "## Reconnect storm (durable-chat)",
        "",
        f"Two pods. Pod A holds {r['sockets']:,} sockets over {r['threads']:,} threads; "
        f"{r['active_threads']} of the threads stream turns from pod B (one token per 20 ms, no "
        f"coalescing window), each with {r['listeners']} sockets there. Pod A gets SIGTERM: its "
        "drain closes every socket (close codes: "
        + ", ".join(f"{k} x {v:,}" for k, v in r["close_codes"].items())
        + "), and each client reconnects to pod B with `after` and `epoch`, backing off as "
        "app/client.py does. Every socket of both pods checks the timeline's `n` across it.",
        "",
        "| | |",
        "| --- | ---: |",
        f"| storm: SIGTERM to the last socket's `ready` on pod B | {r['storm_s']:.2f} s"
        f"{' (gave up waiting)' if r.get('timed_out') else ''} |",
        f"| pod A closed its last socket after | {r['closed_s']:.2f} s |",
        f"| sockets resumed / failed | {r['resumed']:,} / {r['failed_to_resume']:,} |",
        f"| connect attempts during the storm (first connects: {r['sockets']:,} sockets, "
        f"{r['connect_attempts']:,} attempts) | {r['attempts']:,} |",
        f"| sockets closed again after resuming | {r['closed_again']:,} |",
        f"| time without a socket, p50 / p99 / max | {off.get('p50_s', 0):.2f} / "
        f"{off.get('p99_s', 0):.2f} / {off.get('max_s', 0):.2f} s |",
        f"| events checked (both pods' sockets) | {r['events']:,} |",
        f"| lost / doubled / sockets behind at the end | {r['lost']} / {r['doubled']} / "
        f"{r['behind_at_end']} |",
        f"| resumes answered `recovered: false` | {r['not_recovered']} |",
        f"| pod B's CPU during the storm | {r['pod_b_cores_in_storm']:.2f} cores |",
        *(
            f"| pod B's event-loop lag during the storm, {clock} clock: p99 / max "
            f"| {lag.get('p99_ms', '-')} / {lag.get('max_ms', '-')} ms |"
            for clock, lag in r.get("pod_b_loop_lag", {}).items()
        ),
        f"| the reconnecting clients' CPU during the storm | {r['loadgen_cores_in_storm']:.2f} "
        "cores |",
        "| the streams' client's own event-loop lag, p99 calm / storm "
        f"| {_n(r['lag_calm'].get('p99_ms'), 1)} / {_n(r['lag_storm'].get('p99_ms'), 1)} ms |",
        "",
        "Emit-to-receive of the tokens pod B's own sockets received, and commit-to-receive "
        "of their deltas (from Redis's clock in the event's id: the part after the commit, "
        "the pub/sub hop and pod B's forwarding and writing):",
        "",
        "| window | tokens | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, text in (
        ("latency_calm", "calm, before"), ("latency_storm", "during the storm"),
        ("commit_calm", "calm: commit to receive"), ("commit_storm", "storm: commit to receive"),
    ):  # fmt: skip
        lat = r.get(key)
        if lat is None:
            continue
        lines.append(
            f"| {text} | {lat.get('count', 0):,} | {_n(lat.get('p50_ms'), 1)} "
            f"| {_n(lat.get('p90_ms'), 1)} | {_n(lat.get('p99_ms'), 1)} "
            f"| {_n(lat.get('p999_ms'), 1)} | {_n(lat.get('max_ms'), 1)} |"
        )
    if r.get("errors"):
        lines += [
            "",
            "Client errors: " + "; ".join(f"`{k}` (x{v})" for k, v in r["errors"].items()),
        ]
    if r.get("pod_log_warnings"):
        lines += ["", "The pods' warnings and errors, most frequent first:", ""]
        lines += [f"- `{k}` (x{v:,})" for k, v in r["pod_log_warnings"].items()]
    return [*lines, ""]


def _bigroom_md(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    lines = [
        "## Big rooms",
        "",
        f"One server: one thread with {cfg['bigroom_listeners']:,} sockets beside 10 threads of "
        f"5, every thread one token per {cfg['bigroom_token_delay_ms']:g} ms with no "
        "coalescing window (bench/bigroom.py). Loop lag: durable-chat's own probe, to its "
        "histogram's bucket, by the wall clock and by the loop's CPU time.",
        "",
        "| system | run | others' p99 ms | big room deliveries/s | CPU s / 1,000 "
        "| loop lag p99 / max ms (wall) | (loop CPU) |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for s, runs in results["bigroom"].items():
        for label, r in runs.items():
            run = label.replace("_", " ")
            if "failed" in r:
                lines.append(f"| {NAMES[s]} | {run} | failed: {r['failed'][:100]!r} | | | | |")
                continue
            lag = r.get("loop_lag") or {}
            wall, cpu = lag.get("wall", {}), lag.get("cpu", {})
            lines.append(
                f"| {NAMES[s]} | {run} | {_n(r['others'].get('p99_ms'), 1)} "
                f"| {_n(r['big_deliveries_per_s'])} | {_n(r['cpu_per_1000'], 3)} "
                f"| {wall.get('p99_ms', '-')} / {wall.get('max_ms', '-')} "
                f"| {cpu.get('p99_ms', '-')} / {cpu.get('max_ms', '-')} |"
            )
    return [*lines, ""]


# --- plot -----------------------------------------------------------------------


def plot(results: dict[str, Any], d: dict[str, Any], path: Path) -> bool:
    """latest.png; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {"durable": "#1f77b4", "socketio": "#ff7f0e", "node": "#d62728",
              "broadcaster": "#2ca02c", "bare": "#7f7f7f"}  # fmt: skip
    short = {"durable": "durable-chat", "socketio": "socketio", "node": "Node socket.io",
             "broadcaster": "broadcaster", "bare": "bare WS"}  # fmt: skip
    fan = {s: f for s, f in d.get("fanout", {}).items() if "failed" not in f}
    ax = axes[0][0]
    labels, values, cols = [], [], []
    for s, f in fan.items():
        labels.append(short[s])
        values.append(f["frames_per_s"])
        cols.append(colors[s])
    for shape, text in (("per_listener", "redis-py\nper listener"), ("hub", "redis-py\nhub")):
        r = results.get("limits", {}).get(shape, {})
        if "deliveries_per_s" in r:
            labels.append(text)
            values.append(r["deliveries_per_s"])
            cols.append("#c7c7c7")
    ax.bar(labels, values, color=cols)
    ax.set_title("Fan-out at full model speed: deliveries/s (higher is better)")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax = axes[0][1]
    ax.bar([short[s] for s in fan], [f["server_cpu_s_per_1000"] for f in fan.values()],
           color=[colors[s] for s in fan])  # fmt: skip
    ax.set_title("Server CPU seconds per 1,000 deliveries (lower is better)")
    ax = axes[1][0]
    lat = results.get("latency", {})
    if lat:
        window = min(lat, key=lambda w: float(w.removeprefix("window_").removesuffix("ms")))
        for s, r in lat[window].items():
            cdf = r.get("latency", {}).get("cdf_ms")
            if cdf:
                ax.plot(cdf, [i / 200 for i in range(200)], label=short[s], color=colors[s])
        ax.set_xscale("log")
        ax.axvline(10, color="red", linestyle=":", label="10 ms target")
        ax.set_xlabel("emit-to-receive latency, ms (log)")
        ax.set_ylabel("fraction of tokens")
        ax.set_title(f"Paced load, {window.replace('_', ' ')}: latency CDF")
        ax.legend(fontsize=8)
    ax = axes[1][1]
    idle = {s: f for s, f in d.get("idle", {}).items() if f.get("rss_per_socket_kb")}
    ax.bar([short[s] for s in idle], [f["rss_per_socket_kb"] for f in idle.values()],
           color=[colors[s] for s in idle])  # fmt: skip
    ax.axhline(40, color="red", linestyle=":", label="40 KiB target")
    ax.set_title("RSS per idle socket, KiB (lower is better)")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"durable-chat benchmarks ({'quick' if results['quick'] else 'full'} run, "
        f"{results['machine']['cpus']} CPUs, {results['machine']['date']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(results: dict[str, Any], out: Path) -> None:
    derived = derive(results)
    results["derived"] = derived
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "latest.md").write_text(markdown(results, derived))
    if not plot(results, derived, out / "latest.png"):
        print("matplotlib is not installed: no latest.png (pip install -r bench/requirements.txt)")
