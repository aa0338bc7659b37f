"""A short Matching Networks training run on Omniglot (Vinyals split, float32), to see the
accuracy rise above chance. Not the paper's budget.

    python scripts/matching_sanity.py --steps 300 --fce 0 --out runs/matching_sanity

Writes one JSON line per logged step to OUT.jsonl: step, seconds, the running mean of the
training loss and accuracy, and (every --eval-every steps) the accuracy on --eval-episodes
validation episodes predicted with BN running statistics (queries independent).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metacore.algorithms.matching import MatchingNet          # noqa: E402
from metacore.data.omniglot import EpisodeSampler, load_omniglot, split_characters  # noqa
from metacore.models import conv4_protonet                    # noqa: E402
from metacore.optim import make_optimizer                     # noqa: E402


def evaluate(net, params, sampler, episodes):
    accs = []
    for _ in range(episodes):
        ep = sampler.sample(1)
        _, pred = net.predict(params, ep.support_x, ep.support_y, ep.query_x, sampler.n_way)
        accs.append((pred == ep.query_y).mean())
    return float(np.mean(accs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-way", type=int, default=5)
    ap.add_argument("--k-shot", type=int, default=1)
    ap.add_argument("--q-query", type=int, default=5)
    ap.add_argument("--fce", type=int, default=0)
    ap.add_argument("--read-steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/matching_sanity")
    a = ap.parse_args()

    data = load_omniglot(dtype=np.float32)
    train = EpisodeSampler(data.images, split_characters(data, "vinyals", "train"), a.n_way,
                           a.k_shot, a.q_query, seed=a.seed)
    val = EpisodeSampler(data.images, split_characters(data, "vinyals", "val"), a.n_way,
                         a.k_shot, a.q_query, seed=a.seed + 1)
    net = MatchingNet(conv4_protonet(), fce=bool(a.fce), read_steps=a.read_steps)
    params = net.init_params(np.random.default_rng(a.seed), np.float32)
    opt = make_optimizer("adam", size=params.size, dtype=np.float32, lr=a.lr)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    log = open(a.out + ".jsonl", "w")
    t0 = time.time()
    acc0 = evaluate(net, params, val, a.eval_episodes)
    row = {"step": 0, "val_acc": acc0, "chance": 1 / a.n_way, "params": net.num_params,
           "fce": bool(a.fce), "eval_s": time.time() - t0}
    print(json.dumps(row), flush=True)
    log.write(json.dumps(row) + "\n")
    t0 = time.time()
    losses, accs = [], []
    for step in range(1, a.steps + 1):
        ep = train.sample(1)
        loss, grad, acc = net.episode_loss_and_grad(params, ep.support_x, ep.support_y,
                                                    ep.query_x, ep.query_y, a.n_way,
                                                    update_bn_stats=True)
        opt.step(params, grad)
        losses.append(loss)
        accs.append(acc)
        if step % 20 == 0 or step == a.steps:
            row = {"step": step, "seconds": round(time.time() - t0, 1),
                   "train_loss": float(np.mean(losses[-20:])),
                   "train_acc": float(np.mean(accs[-20:]))}
            if step % a.eval_every == 0 or step == a.steps:
                row["val_acc"] = evaluate(net, params, val, a.eval_episodes)
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()


if __name__ == "__main__":
    main()
