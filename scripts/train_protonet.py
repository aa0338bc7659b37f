"""Train Prototypical Networks on Omniglot (Vinyals split, 28x28 ink28, rotations as classes)
under a wall-clock budget, then optionally evaluate.

    python scripts/train_protonet.py --out runs/protonet_k1 --shot 1 --minutes 30
    python scripts/train_protonet.py --out runs/protonet_k1 --eval-only --episodes-eval 1000

Training: N-way K-shot Q-query episodes (paper: 60-way, 5 queries, K = test shot), float32,
Adam (lr 1e-3, halved every --halve episodes as Snell et al.), BN batch statistics per episode
with the running statistics updated (momentum 0.1). Every --log episodes a JSON line goes to
OUT/train.jsonl; OUT/checkpoint.npz (metacore.checkpoint: params, BN buffers, Adam state)
is written every --save episodes and at the end.

Evaluation: 5-way 1-shot and 5-shot (15 queries per class) on --episodes-eval test episodes of
the Vinyals test characters with rotations, BN with the running statistics (no query sees
another); mean accuracy and 95% CI written to OUT/eval.json.
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
from metacore.checkpoint import load_checkpoint, save_checkpoint    # noqa: E402
from metacore.data.omniglot import EpisodeSampler, load_omniglot, split_characters  # noqa: E402
from metacore.optim import make_optimizer                           # noqa: E402


def train(args, pn, data):
    chars = split_characters(data, "vinyals", "train")
    sampler = EpisodeSampler(data.images, chars, args.way, args.shot, args.query, rotate=True,
                             seed=args.seed)
    params = pn.init_params(np.random.default_rng(args.seed), np.float32)
    opt = make_optimizer("adam", size=params.size, dtype=np.float32, lr=args.lr)
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "train.jsonl"), "a")
    t0, ep, acc_sum, loss_sum, n = time.perf_counter(), 0, 0.0, 0.0, 0
    deadline = t0 + 60.0 * args.minutes

    def save():
        arrays = {"params": params, **{f"bn:{k}": v for k, v in pn.model.buffers().items()},
                  **{f"adam:{k}": v for k, v in opt.state_dict().items()
                     if isinstance(v, np.ndarray)}}
        save_checkpoint(os.path.join(args.out, "checkpoint.npz"), arrays,
                        {"episodes": ep, "wall_s": time.perf_counter() - t0, "args": vars(args)})

    while ep < args.episodes and time.perf_counter() < deadline:
        e = sampler.sample(1)
        loss, grad, acc = pn.episode_loss_and_grad(params, e.support_x, e.support_y, e.query_x,
                                                   e.query_y, update_running_stats=True)
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss {loss} at episode {ep}")
        opt.step(params, grad)
        ep += 1
        loss_sum, acc_sum, n = loss_sum + loss, acc_sum + acc, n + 1
        if args.halve and ep % args.halve == 0:
            opt.lr = opt.lr / 2
        if ep % args.log == 0:
            rec = {"episode": ep, "loss": loss_sum / n, "accuracy": acc_sum / n,
                   "wall_s": round(time.perf_counter() - t0, 1), "lr": opt.lr}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
            loss_sum, acc_sum, n = 0.0, 0.0, 0
        if ep % args.save == 0:
            save()
    save()
    print(f"trained {ep} episodes in {time.perf_counter() - t0:.0f} s", flush=True)
    return params


def evaluate(args, pn, data, params):
    chars = split_characters(data, "vinyals", "test")
    out = {}
    for k in (1, 5):
        sampler = EpisodeSampler(data.images, chars, 5, k, 15, rotate=True,
                                 seed=args.eval_seed + k)
        t = time.perf_counter()
        r = pn.evaluate(params, sampler, n_episodes=args.episodes_eval, chunk=20, bn=args.bn)
        out[f"5way_{k}shot"] = {"accuracy": r["accuracy"], "ci95": r["ci95"],
                                "n_episodes": r["n_episodes"], "bn": args.bn,
                                "wall_s": round(time.perf_counter() - t, 1)}
        print(f"5-way {k}-shot: {100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f} %",
              flush=True)
    with open(os.path.join(args.out, f"eval_{args.bn}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--way", type=int, default=60)
    p.add_argument("--shot", type=int, default=1)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--episodes", type=int, default=10 ** 9)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--halve", type=int, default=2000, help="halve lr every this many episodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", type=int, default=10)
    p.add_argument("--save", type=int, default=100)
    p.add_argument("--blas-threads", type=int, default=1)
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--episodes-eval", type=int, default=1000)
    p.add_argument("--eval-seed", type=int, default=2017)
    p.add_argument("--bn", default="running", choices=("running", "batch"))
    args = p.parse_args()
    blas.set_blas_threads(args.blas_threads)
    data = load_omniglot()
    pn = ProtoNet()
    if args.eval_only:
        arrays, meta = load_checkpoint(os.path.join(args.out, "checkpoint.npz"))
        params = arrays["params"]
        pn.model.load_buffers({k[3:]: v for k, v in arrays.items() if k.startswith("bn:")})
        print(f"checkpoint after {meta['episodes']} episodes", flush=True)
    else:
        params = train(args, pn, data)
    if not args.no_eval:
        evaluate(args, pn, data, params)


if __name__ == "__main__":
    main()
