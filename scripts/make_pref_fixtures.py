#!/usr/bin/env python3
"""Writes the preference-training fixtures the Rust tests compare against (tests/fixtures/preference/).

losses.safetensors: fixed float32 inputs (`in.*`) and float64 reference outputs (computed in float64
  from the float32 inputs, gradients by torch autograd) for
  - DPO (TRL 1.16 DPOTrainer._compute_loss; its losses are inline there, so the formula lines are
    copied below, each naming the TRL line): `dpo.{loss_type}.b{beta}.ls{ls}.{loss,grad_chosen,grad_rejected}`
    and `dpo.b0.1.rewards_{chosen,rejected}`;
  - ORPO (TRL's own ORPOTrainer.odds_ratio_loss): `orpo.b0.1.{losses,log_odds,grad_chosen,grad_rejected}`;
  - SimPO (TRL's own CPOTrainer.cpo_loss, loss_type="simpo"): `simpo.b2.0.g{gamma}.ls{ls}.*`;
  - KTO (TRL 1.16 KTOTrainer._compute_loss, inline, copied): `kto.{a,b}.b0.1.wd{wd}.wu{wu}.*`;
  - Bradley-Terry reward loss (TRL 1.16 RewardTrainer.compute_loss, copied): `bt.[margin.][center0.01.]*`;
  the copied DPO/KTO/reward formulas are then checked against TRL's real methods run on stubs (trl_check).
llama_tiny_rm/: a LlamaForSequenceClassification reward model (num_labels=1) built on
  tests/fixtures/llama_tiny with a fresh seeded `score` head and a random LoRA (q_proj, v_proj;
  SEQ_CLS so `score` is a modules_to_save): adapter/ (PEFT save_pretrained), full/ (merged model),
  reference.safetensors (ids, rewards, the pairwise loss and the gradient of every trainable weight).

Setup: python3 -m venv .venv-ref && .venv-ref/bin/pip install torch transformers safetensors peft trl
Run:   .venv-ref/bin/python scripts/make_pref_fixtures.py      (from the repository root)
"""
import contextlib, functools, json, os, pathlib, shutil, types
from collections import defaultdict
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, load_file
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "preference"
BT_CASES = [("bt.", False, None), ("bt.margin.", True, None), ("bt.center0.01.", False, 0.01),
            ("bt.margin.center0.01.", True, 0.01)]
ACC = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)

leaf = lambda x: x.double().detach().requires_grad_(True)  # a float64 copy of a float32 input, tracked
grads = lambda y, *xs: [g.detach() for g in torch.autograd.grad(y, xs)]

@contextlib.contextmanager
def keep_f64():
    """ORPOTrainer.odds_ratio_loss starts with `.float()`; keep float64 tensors float64 while calling it."""
    orig = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self if self.dtype == torch.float64 else orig(self, *a, **k)
    try: yield
    finally: torch.Tensor.float = orig

def dpo_loss(lt, beta, ls, pc, pr, rc, rr, clen, rlen):
    """TRL 1.16 trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss (f_divergence_type="reverse_kl",
    use_weighting=False), one loss type; line numbers refer to that file."""
    chosen_logratios = pc - rc  # l.1350
    rejected_logratios = pr - rr  # l.1351
    chosen_scores, rejected_scores = chosen_logratios, rejected_logratios  # l.1354-1355
    delta_score = chosen_scores - rejected_scores  # l.1383
    if lt == "sigmoid" and ls == 0:
        return -F.logsigmoid(beta * delta_score)  # l.1388
    if lt == "sigmoid":
        # TRL 1.16's sigmoid has no label smoothing; this is the cDPO form older TRL releases used:
        return -(1 - ls) * F.logsigmoid(beta * delta_score) - ls * F.logsigmoid(-beta * delta_score)
    if lt == "hinge":
        return torch.relu(1 - beta * delta_score)  # l.1391
    if lt in ("ipo", "sigmoid_norm"):
        # completion_mask.chunk(2)[i].sum(dim=1) == the completion token counts
        chosen_avg_score = chosen_scores / clen.clamp(min=1.0)  # ipo l.1400, sigmoid_norm l.1506
        rejected_avg_score = rejected_scores / rlen.clamp(min=1.0)  # l.1401, l.1507
        delta = chosen_avg_score - rejected_avg_score  # l.1402 (ipo_delta), l.1508
        if lt == "ipo":
            return (delta - 1 / (2 * beta)) ** 2  # l.1404
        return -F.logsigmoid(beta * delta)  # l.1509
    if lt == "exo_pair":
        epsilon = torch.tensor(ls, dtype=torch.float64)  # l.1410 (TRL: a default-float32 tensor; f64 here)
        qw, log_qw = torch.sigmoid(beta * delta_score), F.logsigmoid(beta * delta_score)  # l.1411-1412
        log_pw = torch.log1p(-epsilon)  # l.1413
        ql, log_ql = torch.sigmoid(-beta * delta_score), F.logsigmoid(-beta * delta_score)  # l.1414-1415
        log_pl = torch.log(epsilon)  # l.1416
        return qw * (log_qw - log_pw) + ql * (log_ql - log_pl)  # l.1417
    if lt == "nca_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios  # l.1420-1421
        return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards))  # l.1422-1426
    if lt == "robust":
        clean_loss_term = -(1 - ls) * F.logsigmoid(beta * delta_score)  # l.1429
        flipped_loss_term = -ls * F.logsigmoid(-beta * delta_score)  # l.1430
        return (clean_loss_term - flipped_loss_term) / (1 - 2 * ls)  # l.1431
    if lt == "bco_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios  # l.1434-1435
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)  # l.1436
    if lt == "sppo_hard":
        winner_margin_error = (chosen_logratios - 0.5 / beta) ** 2  # l.1443
        loser_margin_error = (rejected_logratios + 0.5 / beta) ** 2  # l.1444
        return winner_margin_error + loser_margin_error  # l.1445
    if lt == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)  # l.1471-1473
    if lt == "apo_down":
        losses_chosen = torch.sigmoid(beta * chosen_logratios)  # l.1479
        return losses_chosen + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))  # l.1480-1481
    if lt == "discopop":
        discopop_tau = 0.05  # DPOConfig.discopop_tau default (dpo_config.py l.312)
        logits = delta_score * beta  # l.1485
        log_ratio_modulation = torch.sigmoid(logits / discopop_tau)  # l.1487
        logistic_component = -F.logsigmoid(logits)  # l.1488
        exp_component = torch.exp(-logits)  # l.1489
        return logistic_component * (1 - log_ratio_modulation) + exp_component * log_ratio_modulation  # l.1491-1493
    raise ValueError(lt)

def kto(beta, wd, wu, pc, rc, pr, rr, pkl, rkl):
    """TRL 1.16 trl/trainer/kto_trainer.py, KTOTrainer._compute_loss (loss_type="kto"). There is no
    kto_loss method in 1.16: the formulas are inline there. The KL logps are computed under
    torch.no_grad() (l.1364) and the KL is .detach()ed (l.1443), so no gradient flows through it.
    The desirable/undesirable weights are applied outside the per-example losses (l.1479-1482)."""
    kl = (pkl - rkl).mean().detach()  # l.1443
    kl = kl.clamp(min=0)  # l.1444 (gather_for_metrics(kl).mean() is the identity on one process)
    chosen_logratios = pc - rc  # l.1449
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))  # l.1453
    rejected_logratios = pr - rr  # l.1467
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))  # l.1470
    losses = torch.cat((wd * chosen_losses, wu * rejected_losses), 0)  # l.1479-1482
    return chosen_losses, rejected_losses, losses, kl

def losses_fixture():
    torch.manual_seed(11)
    B = 6
    u = lambda n, lo, hi: (torch.rand(n) * (hi - lo) + lo).float()
    ref_c, ref_r = u(B, -35, -10), u(B, -35, -10)
    pol_c = (ref_c + torch.randn(B) * 4).clamp(-40, -5)
    pol_r = (ref_r + torch.randn(B) * 4).clamp(-40, -5)
    pol_c[0], pol_r[0] = ref_c[0], ref_r[0]
    d = (pol_c.double() - ref_c.double()) - (pol_r.double() - ref_r.double())
    assert (d[1:] > 0).any() and (d[1:] < 0).any() and d[0] == 0, d
    assert ((pol_c - ref_c)[1:] > 0).any() and ((pol_c - ref_c)[1:] < 0).any()
    inp = {"in.policy_chosen": pol_c, "in.policy_rejected": pol_r, "in.ref_chosen": ref_c, "in.ref_rejected": ref_r,
           "in.chosen_len": torch.randint(3, 31, (B,)).float(), "in.rejected_len": torch.randint(3, 31, (B,)).float()}
    out = {}
    for lt in ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
               "apo_down", "sigmoid_norm", "discopop"]:
        for beta in [0.1, 0.5]:
            for ls in {"exo_pair": [0.2], "robust": [0, 0.2], "sigmoid": [0, 0.2]}.get(lt, [0]):
                pc, pr = leaf(pol_c), leaf(pol_r)
                loss = dpo_loss(lt, beta, ls, pc, pr, ref_c.double(), ref_r.double(),
                                inp["in.chosen_len"].double(), inp["in.rejected_len"].double())
                k = f"dpo.{lt}.b{beta}.ls{ls}"
                out[k + ".loss"] = loss.detach()
                out[k + ".grad_chosen"], out[k + ".grad_rejected"] = grads(loss.sum(), pc, pr)
    # l.1582-1583: chosen_rewards = self.beta * chosen_logratios.detach()
    out["dpo.b0.1.rewards_chosen"] = 0.1 * (pol_c.double() - ref_c.double())
    out["dpo.b0.1.rewards_rejected"] = 0.1 * (pol_r.double() - ref_r.double())

    # ORPO and SimPO on length-averaged log-probs; TRL's own methods, called unbound on a stub.
    avg_c, avg_r = u(B, -3, -0.05), u(B, -3, -0.05)
    both = torch.cat([avg_c, avg_r])  # both branches of TRL's log1mexp (split at -ln 2)
    assert (both > -0.6931).any() and (both < -0.6931).any(), both
    inp["in.avg_chosen"], inp["in.avg_rejected"] = avg_c, avg_r
    stub, pc, pr = types.SimpleNamespace(beta=0.1, accelerator=ACC), leaf(avg_c), leaf(avg_r)
    with keep_f64():
        losses = ORPOTrainer.odds_ratio_loss(stub, pc, pr)[0]
    # log_odds per example: the method returns only its mean, so recompute it with its own line (l.693-695)
    from trl.experimental.orpo.orpo_trainer import log1mexp
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    assert losses.dtype == torch.float64 and torch.allclose(losses, 0.1 * F.logsigmoid(log_odds))
    l32 = ORPOTrainer.odds_ratio_loss(stub, avg_c, avg_r)[0]  # TRL as it runs (float32) agrees
    assert torch.allclose(l32.double(), losses.detach(), rtol=1e-5, atol=1e-6)
    out["orpo.b0.1.losses"], out["orpo.b0.1.log_odds"] = losses.detach(), log_odds.detach()
    # ORPOTrainer.get_batch_loss_metrics: loss = policy_nll_loss - losses.mean()
    out["orpo.b0.1.grad_chosen"], out["orpo.b0.1.grad_rejected"] = grads((-losses).sum(), pc, pr)
    for g in [0.5, 1.0]:
        for ls in [0, 0.1]:
            # alpha=0.0 is CPOConfig's default (no AlphaPO transform); cpo_alpha only weighs the separate NLL term
            stub = types.SimpleNamespace(beta=2.0, simpo_gamma=g, label_smoothing=ls, loss_type="simpo", alpha=0.0,
                                         accelerator=ACC)
            pc, pr = leaf(avg_c), leaf(avg_r)
            loss, rew_c, _ = CPOTrainer.cpo_loss(stub, pc, pr)
            k = f"simpo.b2.0.g{g}.ls{ls}"
            out[k + ".loss"] = loss.detach()
            out[k + ".grad_chosen"], out[k + ".grad_rejected"] = grads(loss.sum(), pc, pr)
    out["simpo.b2.0.rewards_chosen"] = rew_c

    # KTO: 4 desirable, 3 undesirable; KL batch of 7 (the mismatched completions of the same batch).
    k_rc, k_rr = u(4, -35, -10), u(3, -35, -10)
    k_pc, k_pr = (k_rc + torch.randn(4) * 3).clamp(-40, -5), (k_rr + torch.randn(3) * 3).clamp(-40, -5)
    ref_kl = u(7, -35, -10)
    kl_a, kl_b = ref_kl + torch.randn(7) + 1.5, ref_kl + torch.randn(7) - 1.5
    assert (kl_a - ref_kl).double().mean() > 0 and (kl_b - ref_kl).double().mean() < 0
    inp.update({"in.kto_policy_chosen": k_pc, "in.kto_ref_chosen": k_rc, "in.kto_policy_rejected": k_pr,
                "in.kto_ref_rejected": k_rr, "in.kto_policy_kl": kl_a, "in.kto_ref_kl": ref_kl,
                "in.kto_policy_kl_b": kl_b, "in.kto_ref_kl_b": ref_kl.clone()})
    for case, pkl in [("a", kl_a), ("b", kl_b)]:
        for wd, wu in [(1.0, 1.0), (1.33, 1.0)]:
            pc, pr = leaf(k_pc), leaf(k_pr)
            cl, rl, wl, kl = kto(0.1, wd, wu, pc, k_rc.double(), pr, k_rr.double(), pkl.double(), ref_kl.double())
            k = f"kto.{case}.b0.1.wd{wd}.wu{wu}"
            out.update({k + ".chosen_losses": cl.detach(), k + ".rejected_losses": rl.detach(),
                        k + ".weighted_losses": wl.detach(), k + ".kl": kl.reshape(1)})
            out[k + ".grad_chosen"], out[k + ".grad_rejected"] = grads(wl.nanmean(), pc, pr)  # l.1548 nanmean
        assert (kl > 0) if case == "a" else (kl == 0)  # case b: TRL clamps the negative KL estimate to 0

    # Bradley-Terry: trl/trainer/reward_trainer.py RewardTrainer.compute_loss l.789-795.
    rm_c, rm_r, rm_m = torch.randn(B) * 1.5, torch.randn(B) * 1.5, torch.rand(B)
    inp.update({"in.rm_chosen": rm_c, "in.rm_rejected": rm_r, "in.rm_margin": rm_m})
    for pre, margin, center in BT_CASES:
        rewards_chosen, rewards_rejected = leaf(rm_c), leaf(rm_r)
        mg = rm_m.double() if margin else 0.0  # l.790 with margin, l.792 without (x - 0.0 == x exactly)
        loss = -F.logsigmoid(rewards_chosen - rewards_rejected - mg).mean()
        if center is not None:
            loss = loss + center * torch.mean((rewards_chosen + rewards_rejected) ** 2)  # l.795
        out[pre + "loss"] = loss.detach().reshape(1)
        out[pre + "grad_chosen"], out[pre + "grad_rejected"] = grads(loss, rewards_chosen, rewards_rejected)

    assert all(v.dtype == torch.float32 for v in inp.values()) and all(v.dtype == torch.float64 for v in out.values())
    OUT.mkdir(parents=True, exist_ok=True)
    trl_check({**inp, **out})
    save_file({k: v.contiguous() for k, v in {**inp, **out}.items()}, str(OUT / "losses.safetensors"))
    print("losses.safetensors:", len(inp), "inputs,", len(out), "outputs")

def trl_check(f):
    """Runs TRL 1.16's real DPOTrainer._compute_loss (one pair at a time), KTOTrainer._compute_loss and
    RewardTrainer.compute_loss on stubs (a fake model whose per-token log-probs hold the summed log-probs in
    the last position) and asserts they agree with the copied formulas: loss and gradients. exo_pair differs
    by ~2e-8 because TRL builds its epsilon as a float32 tensor."""
    from trl import DPOTrainer, KTOTrainer, RewardTrainer
    stub = lambda **kw: types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=ACC, _tp_size=1,
                                              aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
                                              _total_train_tokens=0, **kw)
    ones = lambda n, t: torch.ones(n, t, dtype=torch.long)
    def fake(lp, t):
        z = torch.zeros(lp.shape[0], t - 1, dtype=torch.float64)
        return types.SimpleNamespace(log_probs=torch.cat([z[:, 1:], lp[:, None]], 1), entropy=z, mean_logits=z,
                                     is_top1=z.bool())
    for k in [k[:-5] for k in f if k.startswith("dpo.") and k.endswith(".loss")]:
        lt, rest = k[4:].split(".b", 1)
        beta, ls = map(float, rest.split(".ls"))
        if lt == "sigmoid" and ls:
            continue  # cDPO, not in TRL 1.16
        s = stub(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[lt],
                 loss_weights=[1.0], beta=beta, label_smoothing=ls, use_weighting=False,
                 args=types.SimpleNamespace(discopop_tau=0.05))
        for i in range(len(f["in.policy_chosen"])):
            pc, pr = leaf(f["in.policy_chosen"][i:i + 1]), leaf(f["in.policy_rejected"][i:i + 1])
            lens = torch.stack([f["in.chosen_len"][i], f["in.rejected_len"][i]])
            inputs = {"input_ids": ones(2, 32), "attention_mask": ones(2, 32),
                      "completion_mask": (torch.arange(32) >= 32 - lens[:, None]).long(),
                      "ref_chosen_logps": f["in.ref_chosen"][i:i + 1].double(),
                      "ref_rejected_logps": f["in.ref_rejected"][i:i + 1].double()}
            loss = DPOTrainer._compute_loss(s, lambda **kw: fake(torch.cat([pc, pr]), 32), inputs, False)
            got = torch.cat([loss.reshape(1), *grads(loss, pc, pr)])
            want = torch.stack([f[k + ".loss"][i], f[k + ".grad_chosen"][i], f[k + ".grad_rejected"][i]])
            assert torch.allclose(got, want, rtol=0, atol=1e-7 if lt == "exo_pair" else 1e-12), (k, i, got, want)
    for k in [k[:-3] for k in f if k.startswith("kto.") and k.endswith(".kl")]:
        sfx = "_b" if k.startswith("kto.b.") else ""
        wd, wu = map(float, k.split(".wd")[1].split(".wu"))
        s = stub(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.1, desirable_weight=wd,
                 undesirable_weight=wu)
        s._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, s)
        pc, pr = leaf(f["in.kto_policy_chosen"]), leaf(f["in.kto_policy_rejected"])
        kl_out, main_out = fake(f["in.kto_policy_kl" + sfx].double(), 33), fake(torch.cat([pc, pr]), 32)
        inputs = {"input_ids": ones(7, 32), "attention_mask": ones(7, 32), "completion_mask": ones(7, 32),
                  "KL_input_ids": ones(7, 33), "KL_attention_mask": ones(7, 33), "KL_completion_mask": ones(7, 33),
                  "label": torch.arange(7) < 4, "ref_KL_logps": f["in.kto_ref_kl" + sfx].double(),
                  "ref_logps": torch.cat([f["in.kto_ref_chosen"], f["in.kto_ref_rejected"]]).double()}
        loss = KTOTrainer._compute_loss(s, lambda input_ids, **kw: kl_out if input_ids.shape[1] == 33 else main_out,
                                        inputs, False)
        got = torch.cat([loss.reshape(1), *grads(loss, pc, pr), torch.tensor(s._metrics["train"]["kl"], dtype=torch.float64)])
        want = torch.cat([f[k + ".weighted_losses"].mean().reshape(1), f[k + ".grad_chosen"], f[k + ".grad_rejected"],
                          f[k + ".kl"]])
        assert torch.allclose(got, want, rtol=0, atol=1e-12), (k, (got - want).tolist())
    for pre, margin, center in BT_CASES:
        rc, rr = leaf(f["in.rm_chosen"]), leaf(f["in.rm_rejected"])
        inputs = {"attention_mask": ones(12, 4), **({"margin": f["in.rm_margin"].double()} if margin else {})}
        s = stub(args=types.SimpleNamespace(center_rewards_coefficient=center))
        loss = RewardTrainer.compute_loss(s, lambda **kw: types.SimpleNamespace(logits=torch.cat([rc, rr])[:, None]),
                                          inputs)
        got = torch.cat([loss.reshape(1), *grads(loss, rc, rr)])
        want = torch.cat([f[pre + "loss"], f[pre + "grad_chosen"], f[pre + "grad_rejected"]])
        assert torch.allclose(got, want, rtol=0, atol=1e-12), (pre, got, want)
    print("TRL's own DPO/KTO/reward losses agree with the copied formulas")

def rm_fixture():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification
    base_dir = ROOT / "tests" / "fixtures" / "llama_tiny"
    d = OUT / "llama_tiny_rm"
    model = LlamaForSequenceClassification.from_pretrained(base_dir, num_labels=1, pad_token_id=0,
                                                           attn_implementation="eager").eval()
    torch.manual_seed(7)
    torch.nn.init.normal_(model.score.weight, std=0.02)  # the fresh head: seeded, not zero
    assert model.score.bias is None and model.score.weight.abs().sum() > 0
    torch.manual_seed(8)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                     init_lora_weights=False, task_type="SEQ_CLS")
    m = get_peft_model(model, cfg).eval()
    assert "score" in m.peft_config["default"].modules_to_save, m.peft_config["default"].modules_to_save
    (d / "adapter").mkdir(parents=True, exist_ok=True)
    m.save_pretrained(d / "adapter")
    (d / "adapter" / "README.md").unlink(missing_ok=True)
    c = json.load(open(d / "adapter" / "adapter_config.json"))
    c["base_model_name_or_path"] = "tests/fixtures/llama_tiny"
    c["target_modules"], c["modules_to_save"] = sorted(c["target_modules"]), sorted(c["modules_to_save"])  # sets
    json.dump(c, open(d / "adapter" / "adapter_config.json", "w"), indent=2)
    saved = sorted(load_file(str(d / "adapter" / "adapter_model.safetensors")))

    g = torch.Generator().manual_seed(9)
    c_len, r_len = torch.tensor([7, 12, 5]), torch.tensor([10, 6, 9])  # ids 1..319, right-padded with 0
    c_ids, r_ids = [torch.randint(1, 320, (3, int(n.max())), generator=g) * (torch.arange(n.max()) < n[:, None])
                    for n in (c_len, r_len)]
    reward = lambda mod, ids: mod(input_ids=ids, attention_mask=(ids != 0).long()).logits[:, 0]
    r_c, r_r = reward(m, c_ids), reward(m, r_ids)
    loss = -F.logsigmoid(r_c - r_r).mean()  # RewardTrainer.compute_loss, no margin, no centering
    loss.backward()
    ref = {"chosen_ids": c_ids, "rejected_ids": r_ids, "chosen_len": c_len, "rejected_len": r_len,
           "rewards_chosen": r_c.detach(), "rewards_rejected": r_r.detach(), "loss": loss.detach().reshape(1)}
    for n, p in m.named_parameters():
        if p.requires_grad:
            ref["grad." + n.replace("modules_to_save.default.", "").replace(".default", "")] = p.grad.detach()
    assert sorted(k[5:] for k in ref if k.startswith("grad.")) == saved, saved
    # The pooled token is the rightmost non-pad one (GenericForSequenceClassification): check against the
    # unpadded single-row forward.
    with torch.no_grad():
        for i in range(3):
            one = m(input_ids=c_ids[i:i + 1, :c_len[i]]).logits[0, 0]
            assert torch.allclose(one, r_c[i], atol=1e-6), (one, r_c[i])
        merged = m.merge_and_unload().eval()
        ref["rewards_chosen_merged"] = reward(merged, c_ids)
    assert torch.allclose(ref["rewards_chosen_merged"], ref["rewards_chosen"], atol=1e-6)
    merged.save_pretrained(d / "full", safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(base_dir / f, d / "full" / f)
    fc = json.load(open(d / "full" / "config.json"))
    assert fc["id2label"] == {"0": "LABEL_0"} and fc["pad_token_id"] == 0 and fc["architectures"] == [
        "LlamaForSequenceClassification"], fc
    save_file({k: v.contiguous() for k, v in ref.items()}, str(d / "reference.safetensors"))
    print("adapter keys:", saved)
    print("rewards", ref["rewards_chosen"].tolist(), ref["rewards_rejected"].tolist(), "loss", loss.item())

if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    losses_fixture()
    rm_fixture()
