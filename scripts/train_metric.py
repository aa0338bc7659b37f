"""Train a metric-based few-shot learner on Omniglot (Vinyals split, 28x28 ink28, rotations
as classes) under a wall-clock budget, then evaluate it.

    python scripts/train_metric.py --algo protonet --out runs/protonet_k1 --shot 1 --minutes 30
    python scripts/train_metric.py --algo relation --out runs/relation_k1 --minutes 20
    python scripts/train_metric.py --algo siamese  --out runs/siamese --minutes 20
    python scripts/train_metric.py --algo protonet --out runs/protonet_k1 --eval-only

Training (float32, Adam lr 1e-3, halved every --halve steps; BN batch statistics with the
running statistics updated, momentum 0.1):
  protonet  N-way K-shot Q-query episodes; defaults 60-way, 5 queries (Snell et al. 2017)
  relation  defaults 5-way, 19 queries per class for 1-shot, 15 for 5-shot (Sung et al. 2018)
  siamese   --pairs verification pairs per step, half same-class (Koch et al. 2015's loss)
Every --log steps a JSON line goes to OUT/train.jsonl; OUT/checkpoint.npz (metacore.checkpoint:
params, BN buffers, Adam state, JSON meta) is written every --save steps and at the end.

Evaluation: 5-way 1-shot and 5-shot, 15 queries per class, --episodes-eval test episodes of the
Vinyals test characters with rotations, and Lake's 20 one-shot runs (20-way, within
alphabet); BN with the running statistics by default (no query sees another). Mean accuracy
and 95% CI (1.96 std / sqrt(n)) go to OUT/eval_<bn>.json.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metacore import blas                                           # noqa: E402
from metacore.algorithms.protonet import ProtoNet                   # noqa: E402
from metacore.algorithms.relation import RelationNet                # noqa: E402
from metacore.algorithms.siamese import PairSampler, SiameseNet, lake_accuracy  # noqa: E402
from metacore.checkpoint import load_checkpoint, save_checkpoint    # noqa: E402
from metacore.data.omniglot import EpisodeSampler, load_omniglot, split_characters  # noqa: E402
from metacore.optim import make_optimizer                           # noqa: E402

DEFAULTS = {   # algo -> way, query, halve
    "protonet": (60, 5, 2000),
    "relation": (5, None, 100000),
    "siamese": (None, None, 0),
}


def build(algo):
    """-> the algorithm object and {checkpoint key prefix: Model with BN buffers}."""
    if algo == "protonet":
        alg = ProtoNet()
        return alg, {"": alg.model}
    if algo == "relation":
        alg = RelationNet()
        return alg, {"embed.": alg.embed, "relation.": alg.relation}
    alg = SiameseNet()
    return alg, {"embed.": alg.embed}


def train(args, alg, bn_models, data):
    chars = split_characters(data, "vinyals", "train")
    if args.algo == "siamese":
        sampler = PairSampler(data.images, chars, rotate=True, seed=args.seed)
    else:
        sampler = EpisodeSampler(data.images, chars, args.way, args.shot, args.query,
                                 rotate=True, seed=args.seed)
    params = alg.init_params(np.random.default_rng(args.seed), np.float32)
    opt = make_optimizer("adam", size=params.size, dtype=np.float32, lr=args.lr)
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "train.jsonl"), "a")
    t0, step, acc_sum, loss_sum, n = time.perf_counter(), 0, 0.0, 0.0, 0
    deadline = t0 + 60.0 * args.minutes

    def save():
        arrays = {"params": params,
                  **{f"bn:{pre}{k}": v for pre, m in bn_models.items()
                     for k, v in m.buffers().items()},
                  **{f"adam:{k}": v for k, v in opt.state_dict().items()
                     if isinstance(v, np.ndarray)}}
        save_checkpoint(os.path.join(args.out, "checkpoint.npz"), arrays,
                        {"episodes": step, "wall_s": time.perf_counter() - t0,
                         "args": vars(args)})

    while step < args.episodes and time.perf_counter() < deadline:
        if args.algo == "siamese":
            b = sampler.sample(1, args.pairs)
            loss, grad, acc = alg.episode_loss_and_grad(params, b.x1, b.x2, b.same,
                                                        update_running_stats=True)
        else:
            e = sampler.sample(1)
            loss, grad, acc = alg.episode_loss_and_grad(params, e.support_x, e.support_y,
                                                        e.query_x, e.query_y,
                                                        update_running_stats=True)
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss {loss} at step {step}")
        opt.step(params, grad)
        step += 1
        loss_sum, acc_sum, n = loss_sum + loss, acc_sum + acc, n + 1
        if args.halve and step % args.halve == 0:
            opt.lr = opt.lr / 2
        if step % args.log == 0:
            rec = {"episode": step, "loss": loss_sum / n, "accuracy": acc_sum / n,
                   "wall_s": round(time.perf_counter() - t0, 1), "lr": opt.lr}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
            loss_sum, acc_sum, n = 0.0, 0.0, 0
        if step % args.save == 0:
            save()
    save()
    print(f"trained {step} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return params


def evaluate(args, alg, data, params):
    chars = split_characters(data, "vinyals", "test")
    out = {}
    for k in args.eval_shots:
        sampler = EpisodeSampler(data.images, chars, 5, k, 15, rotate=True,
                                 seed=args.eval_seed + k)
        t = time.perf_counter()
        r = alg.evaluate(params, sampler, n_episodes=args.episodes_eval, chunk=20, bn=args.bn)
        out[f"5way_{k}shot"] = {"accuracy": r["accuracy"], "ci95": r["ci95"],
                                "n_episodes": r["n_episodes"], "bn": args.bn,
                                "wall_s": round(time.perf_counter() - t, 1)}
        print(f"5-way {k}-shot: {100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f} %",
              flush=True)
    if not args.no_lake:
        r = lake_accuracy(alg.predict, params, data, bn=args.bn)
        out["lake_20way_1shot"] = {"accuracy": r["accuracy"], "ci95": r["ci95"], "runs": 20,
                                   "bn": args.bn}
        print(f"Lake 20 runs, 20-way 1-shot: {100 * r['accuracy']:.2f} "
              f"+- {100 * r['ci95']:.2f} %", flush=True)
    with open(os.path.join(args.out, f"eval_{args.bn}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", required=True, choices=sorted(DEFAULTS))
    p.add_argument("--out", required=True)
    p.add_argument("--way", type=int, default=None)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--query", type=int, default=None)
    p.add_argument("--pairs", type=int, default=64, help="siamese: pairs per step")
    p.add_argument("--episodes", type=int, default=10 ** 9, help="maximum training steps")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--halve", type=int, default=None, help="halve lr every this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", type=int, default=10)
    p.add_argument("--save", type=int, default=100)
    p.add_argument("--blas-threads", type=int, default=1)
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--episodes-eval", type=int, default=1000)
    p.add_argument("--eval-seed", type=int, default=2017)
    p.add_argument("--bn", default="running", choices=("running", "batch"))
    p.add_argument("--eval-shots", type=lambda s: [int(k) for k in s.split(",")],
                   default=[1, 5], help="comma-separated shots to evaluate, e.g. 5")
    p.add_argument("--no-lake", action="store_true", help="skip Lake's 20 runs")
    args = p.parse_args(argv)
    way, query, halve = DEFAULTS[args.algo]
    args.way = args.way if args.way is not None else way
    args.halve = args.halve if args.halve is not None else halve
    if args.query is None:
        args.query = query if query is not None else (19 if args.shot == 1 else 15)
    blas.set_blas_threads(args.blas_threads)
    data = load_omniglot()
    alg, bn_models = build(args.algo)
    if args.eval_only:
        arrays, meta = load_checkpoint(os.path.join(args.out, "checkpoint.npz"))
        params = arrays["params"]
        for pre, m in bn_models.items():
            m.load_buffers({k[3 + len(pre):]: v for k, v in arrays.items()
                            if k.startswith("bn:" + pre)})
        print(f"checkpoint after {meta['episodes']} steps", flush=True)
    else:
        params = train(args, alg, bn_models, data)
    if not args.no_eval:
        evaluate(args, alg, data, params)


if __name__ == "__main__":
    main()
