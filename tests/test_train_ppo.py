"""train_ppo.py end to end on the tiny built-in task (tests/conftest.py::run_dir): the one-command
pipeline under 2-process torchrun (DDP and FSDP2, gloo; two nodes: tests/test_two_nodes.py), exact
resume after a crash, the BT baseline (its reward normalisation kept for --resume), bt-anchor with
critic warm-up, the critic-free estimators (grpo, rloo) and the in-group pairwise reward, and
refusals. Models and prompts are tiny, so these check plumbing, not learning.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import train_ppo
from nanopairwise import ops, ppo
from nanopairwise.guards import NonFiniteError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "3", "--prompts-per-step", "4", "--samples-per-prompt", "2", "--max-new-tokens", "8",
        "--eval-size", "4", "--ppo-epochs", "1", "--minibatches", "2", "--anchor-samples", "2"]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_rows(out_dir):
    return {r["step"]: r for r in metrics(out_dir) if "reward/score" in r}


@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "ddp-rloo-group"])
def test_torchrun_two_processes(run_dir, tmp_path, sharding):
    """ddp-rloo-group: critic-free RLOO on the in-group reward with the anchor, 2 ranks: the judge's
    rows are summed over the ranks (4 prompts x 3 pairs x 2 orders)."""
    out = str(tmp_path / sharding)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_ppo.py"), "--run-dir", str(run_dir), "--out-dir", out, *FAST]
    cmd += ["--fsdp"] if sharding == "fsdp" else []
    if sharding == "ddp-rloo-group":
        cmd += ["--advantage-estimator", "rloo", "--reward", "pairwise-group", "--group-anchor"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) on cpu" in proc.stdout and "held-out metric" in proc.stdout
    rows = step_rows(out)
    assert sorted(rows) == [1, 2, 3]
    assert all(0.0 <= rows[s]["rollout/win_rate"] <= 1.0 for s in rows)
    if sharding == "ddp-rloo-group":
        assert all(rows[s]["perf/judge_rows"] == 4 * 3 * 2 for s in rows)
        assert not os.path.exists(os.path.join(out, "checkpoint", "critic"))
    history = json.load(open(os.path.join(out, "eval.json")))
    assert {"oracle_score", "oracle_win_rate", "judge_win_rate", "kl", "length"} <= set(history["after"])
    assert os.path.exists(os.path.join(out, "checkpoint", "policy", "model.safetensors"))


class Crash(Exception):
    pass


GRPO_GROUP = ["--advantage-estimator", "grpo", "--reward", "pairwise-group"]


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "4"], ["--critic-lora-rank", "4"], GRPO_GROUP])
def test_resume_after_a_crash_gives_the_same_next_steps(run_dir, tmp_path, monkeypatch, lora):
    """Crash right after the step-1 checkpoint; the resumed run's steps 2 and 3 equal the
    uninterrupted run's (same rollouts, same losses, same evaluation). With LoRA the reference
    is the policy with adapters off: the KL starts at exactly 0 and then moves. With
    --critic-lora-rank the critic's adapters and head come back from the trainer state, and
    resuming without the flag is refused. GRPO on the in-group pairwise reward: no critic is
    saved, nor its optimizer state."""
    args = ["--run-dir", str(run_dir), "--save-every", "1", *FAST, *lora]
    straight = train_ppo.main(args + ["--out-dir", str(tmp_path / "straight")])
    make_experience = train_ppo.make_experience

    def crash_at_step_2(*a):
        if crash_at_step_2.calls == 1:
            raise Crash()
        crash_at_step_2.calls += 1
        return make_experience(*a)

    crash_at_step_2.calls = 0
    monkeypatch.setattr(train_ppo, "make_experience", crash_at_step_2)
    with pytest.raises(Crash):
        train_ppo.main(args + ["--out-dir", str(tmp_path / "crashed")])
    monkeypatch.setattr(train_ppo, "make_experience", make_experience)
    resumed = train_ppo.main(args + ["--out-dir", str(tmp_path / "crashed"), "--resume"])
    a, b = step_rows(str(tmp_path / "straight")), step_rows(str(tmp_path / "crashed"))
    assert sorted(b) == [1, 2, 3]
    for s in (2, 3):  # bit for bit: weights, optimizer state and every seed come back exactly
        for key in ("reward/score", "rollout/kl", "loss/pg", "loss/v", "ppo/clipfrac", "rollout/length"):
            assert b[s][key] == a[s][key], (s, key)
    assert resumed["after"] == straight["after"]
    assert resumed["before"] == straight["before"]              # the crashed run's "before" is kept
    if lora == GRPO_GROUP:
        ckpt = tmp_path / "crashed" / "checkpoint"
        assert not (ckpt / "critic").exists() and (ckpt / "policy" / "model.safetensors").exists()
        assert len(torch.load(ckpt / "optimizers.pt", weights_only=False)) == 1         # the policy's only
        assert all(a[s]["loss/v"] == 0.0 and "critic/explained_var" not in a[s] for s in a)
        assert all(a[s]["perf/judge_rows"] == 4 * 1 * 2 for s in a)   # 4 prompts x K(K-1)/2 = 1 pair x 2 orders
    elif "--lora-rank" in lora:
        assert a[1]["rollout/kl"] == 0.0 and straight["after"]["kl"] != 0.0
    if "--critic-lora-rank" in lora:
        with pytest.raises(UserError, match="with --critic-lora-rank"):
            train_ppo.main(args[:-2] + ["--out-dir", str(tmp_path / "crashed"), "--resume", "--steps", "4"])


def test_divergence_guard_stops_before_saving(run_dir, tmp_path):
    """--lr 3 runs away from the reference in its first update (KL of millions of nats): the
    check before the step-1 checkpoint stops the run, and nothing is saved."""
    out = tmp_path / "lr3"
    with pytest.raises(UserError, match=r"^step 1: the updated policy's KL to the reference \(k2 on this step's "
                                        r"rollouts\) is [\d.e+]+, above --max-kl 10: the policy diverged; stopped "
                                        r"before saving, no checkpoint was written"):
        train_ppo.main(["--run-dir", str(run_dir), "--out-dir", str(out), "--lr", "3", "--save-every", "1", *FAST])
    assert sorted(step_rows(str(out))) == [1] and not (out / "checkpoint").exists()


def test_nan_in_the_ppo_loss_stops_before_the_step(run_dir, tmp_path, monkeypatch):
    """A NaN critic loss (injected) stops the update before any optimizer step, naming the step as
    logged, the quantity and the critic's flags; nothing is saved and the policy is untouched."""
    ppo_loss = ops.ppo_loss

    def nan_value_loss(*a, **k):
        out = ppo_loss(*a, **k)
        return out._replace(loss=out.loss * float("nan"), v_loss=out.v_loss * float("nan"))

    monkeypatch.setattr(ops, "ppo_loss", nan_value_loss)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match=r"^step 1: critic loss \(v\) is nan, policy grad norm is nan, critic grad "
                                             r"norm is nan; stopped before the optimizer step, no checkpoint was "
                                             r"written. Look at .*--critic-lr 0.0005 and --vf-coef \(critic\)"):
        train_ppo.main(["--run-dir", str(run_dir), "--out-dir", str(out), "--save-every", "1", *FAST])
    assert not (out / "checkpoint").exists()


def test_missing_reward_model_for_user_data_is_refused(run_dir, tmp_path):
    prompts = os.path.join(str(run_dir), "task", "rl_train.jsonl")
    with pytest.raises(UserError, match="no reward model at"):
        train_ppo.main(["--prompts", prompts, "--policy", os.path.join(str(run_dir), "task", "policy"),
                        "--judge", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "o"), *FAST])


# ----------------------------------------------------------------------------------------------
# baseline fairness: BT normalisation, bt-anchor, critic warm-up


def test_bt_normalisation_is_stored_and_reused_on_resume(run_dir, tmp_path, monkeypatch):
    """--reward bt measures (mu, sigma) once, keeps them in the checkpoint, and a resumed run reads
    them back instead of measuring again (here: measuring again would fail)."""
    out = str(tmp_path / "bt")
    args = ["--run-dir", str(run_dir), "--reward", "bt", "--out-dir", out, "--eval-every", "0", *FAST[2:]]
    train_ppo.main(args + ["--steps", "1"])
    norm = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=False)["reward_norm"]
    assert norm["n"] == 32 * 2 and norm["std"] > 0 and norm["mean"] == norm["mean"]   # 32 tiny prompts x K=2
    monkeypatch.setattr(train_ppo, "measure_reward_norm", lambda *a: pytest.fail("measured again on --resume"))
    seen = []
    score = ppo.score_responses
    monkeypatch.setattr(ppo, "score_responses", lambda *a, **kw: seen.append(a[4].norm) or score(*a, **kw))
    history = train_ppo.main(args + ["--steps", "2", "--resume"])
    assert seen and all(s == norm for s in seen)
    again = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=False)
    assert again["step"] == 2 and again["reward_norm"] == norm
    assert "oracle_score" in history["after"]
    assert "rollout/win_rate" not in step_rows(out)[2]            # a scalar reward has no win rate


def test_critic_warmup_leaves_the_policy_unchanged(run_dir, tmp_path, monkeypatch):
    """--reward bt-anchor with one warm-up step of two: after step 1 the policy's weights are the
    initial ones bit for bit while the critic's moved; step 2 (no warm-up) changes the policy.
    The reward is a win probability, like pairwise's."""
    snapshots = []
    update = train_ppo.ppo_update

    def spy(experience, models, optimizers, *rest, warmup=False):
        if not snapshots:
            snapshots.append([[p.detach().clone() for p in m.parameters()] for m in (models[0], models[2])])
        out = update(experience, models, optimizers, *rest, warmup=warmup)
        snapshots.append([[p.detach().clone() for p in m.parameters()] for m in (models[0], models[2])])
        return out

    monkeypatch.setattr(train_ppo, "ppo_update", spy)
    out = str(tmp_path / "warm")
    history = train_ppo.main(["--run-dir", str(run_dir), "--out-dir", out, "--reward", "bt-anchor",
                              "--critic-warmup-steps", "1", "--eval-every", "0", *FAST[:1], "2", *FAST[2:],
                              "--reward-norm", "none"])   # a 2-step BT model: bt-anchor's scores have no spread
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))
    (policy0, critic0), (policy1, critic1), (policy2, _) = snapshots
    assert same(policy0, policy1) and not same(critic0, critic1)   # warm-up: only the critic learned
    assert not same(policy1, policy2)                              # then the policy trains
    rows = step_rows(out)
    assert "oracle_score" in history["after"] and all(0.0 <= rows[s]["rollout/win_rate"] <= 1.0 for s in rows)


def test_minibatches_must_divide_the_rank_batch(tmp_path):
    """4 prompts x 2 samples = 8 rows do not split into 3 minibatches: a UserError naming the flag,
    before anything is read (was: rows silently dropped)."""
    with pytest.raises(UserError, match="--minibatches 3: each rank's batch of 4 prompts x 2 samples"):
        train_ppo.main(["--run-dir", str(tmp_path / "never"), *FAST, "--minibatches", "3"])

def test_critic_free_flags_are_checked(run_dir, tmp_path):
    """grpo / rloo and pairwise-group need K >= 2 samples per prompt; grpo / rloo have no critic
    to warm up; a checkpoint resumes only with the estimator that wrote it (rloo here: one step,
    KL in the loss, the anchor in the group)."""
    base = ["--run-dir", str(run_dir), "--out-dir", str(tmp_path / "o"), *FAST]
    for flags in (["--advantage-estimator", "rloo"], ["--reward", "pairwise-group"]):
        with pytest.raises(UserError, match=r"--samples-per-prompt 1: .* compare each sample with the other samples"):
            train_ppo.main(base + flags + ["--samples-per-prompt", "1"])
    with pytest.raises(UserError, match="--advantage-estimator grpo has no critic to warm up"):
        train_ppo.main(base + ["--advantage-estimator", "grpo", "--critic-warmup-steps", "1"])
    with pytest.raises(UserError, match="--critic-lora-rank 4: --advantage-estimator grpo has no critic to adapt"):
        train_ppo.main(base + ["--advantage-estimator", "grpo", "--critic-lora-rank", "4"])
    rloo = base + ["--advantage-estimator", "rloo", "--kl-mode", "loss", "--reward", "pairwise-group",
                   "--group-anchor", "--eval-every", "0"]
    train_ppo.main(rloo + ["--steps", "1"])
    row = step_rows(str(tmp_path / "o"))[1]
    assert row["loss/kl"] > 0.0 and 0.0 <= row["rollout/win_rate"] <= 1.0 and row["perf/judge_rows"] == 4 * 3 * 2
    with pytest.raises(UserError, match="written with --advantage-estimator rloo; resume with the same"):
        train_ppo.main(base + ["--steps", "2", "--resume"])
    out = tmp_path / "gae_group"                  # the in-group reward with a critic: the standard one, from the judge
    train_ppo.main(["--run-dir", str(run_dir), "--out-dir", str(out), *FAST, "--steps", "1", "--eval-every", "0",
                    "--reward", "pairwise-group"])
    assert "critic/explained_var" in step_rows(str(out))[1] and (out / "checkpoint" / "critic").exists()


def test_every_arm_is_normalised_and_its_critic_starts_at_the_mean_score(run_dir, tmp_path, monkeypatch):
    """Defaults on the pairwise arm: the initial policy's score statistics are measured and kept,
    the score is divided by their std (--reward-norm init-std), the fresh critic head's bias is the
    initial mean score in those units (--critic-bias init-mean), reward/score_std is logged, and
    eval.json's KL is the exact one (>= 0) next to its k1 estimate."""
    biases = []
    update = train_ppo.ppo_update
    monkeypatch.setattr(train_ppo, "ppo_update", lambda e, models, *a, **k: biases.append(
        unwrap_head_bias(models[2])) or update(e, models, *a, **k))
    out = str(tmp_path / "pw")
    history = train_ppo.main(["--run-dir", str(run_dir), "--out-dir", out, "--eval-every", "0", *FAST[:1], "1",
                              *FAST[2:]])
    state = torch.load(os.path.join(out, "checkpoint", "trainer_state.pt"), weights_only=False)
    norm = state["reward_norm"]
    assert norm["n"] == 32 * 2 and norm["std"] > 0 and 0.0 <= norm["truncated"] <= 1.0
    expected = norm["mean"] / norm["std"] - 0.5 * norm["truncated"]        # prob / std, less the truncation penalty
    assert biases[0] == pytest.approx(expected, rel=1e-5)
    assert step_rows(out)[1]["reward/score_std"] > 0
    after = history["after"]
    assert after["kl"] >= -1e-6 and "kl_k1" in after


def unwrap_head_bias(critic):
    return (critic.module if hasattr(critic, "module") else critic).score_head.bias.item()
