"""Stage-0 recipe sweep: the teacher's training loop (distill.py stage 0: answer-token cross-entropy
+ per-cell auxiliary classifier on the vision stem; distill.py's own optimiser, schedule and answer
loss) in one file with knobs, for running many variants at once on a GPU and reading teacher-forced exact-match
accuracy per category every `eval_every` steps (equal to greedy exact match: an answer is right
when every answer token and the closing <|im_end|> is the argmax).

Not part of the pipeline: a research tool, kept as it ran. It imports names distill.py no longer
has (DistillConfig, make_optimizer, answer_ce: now teacher/train.py); run it from its commit: `git checkout dd5ae0d`. The logs of the runs of 2026-11-23 (one H100, 8 variants
at a time, each one process) are in experiments/teacher_sweep_logs/ (sweepK_NAME.log; the variants
are listed in experiments/README.md with what they showed).

Run:  python experiments/teacher_sweep.py NAME key=value ...   # e.g. lr=5e-4 steps=3000 aux=none
      logs go to $OUT/NAME.log (default /tmp); keys and defaults: the dict P below.
"""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import torch, torch.nn as nn, torch.nn.functional as F
import data
from distill import DistillConfig, answer_ce, make_optimizer, wsd_lr
from model import Model, ModelConfig

name = sys.argv[1]
P = dict(lr=2e-3, bs=32, steps=3000, aux="cos", aux_w=1.0, wd=0.05, minutes=8.0, seed=0,
         warm=0.05, decay=0.2, eval_every=250, scale=16.0, maxobj=8, minobj=3, threads=1, workers=2,
         grid=8, patch=8, cats="all", b2=0.95, clip=2.0, hidden=192, heads=6, save=0, turns=1)
for kv in sys.argv[2:]:
    k, v = kv.split("=")
    P[k] = type(P[k])(v) if not isinstance(P[k], str) else v
torch.set_num_threads(P["threads"])
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = True
out = os.environ.get("OUT", "/tmp")
log = open(os.path.join(out, f"{name}.log"), "w")
def say(*a):
    s = " ".join(str(x) for x in a); print(f"[{name}] {s}", flush=True); log.write(s + "\n"); log.flush()
say(json.dumps(P))
cats = data.CATEGORIES if P["cats"] == "all" else tuple(P["cats"].split(","))
dcfg = data.DataConfig(max_objects=P["maxobj"], min_objects=P["minobj"], grid=P["grid"], cell_size=128 // P["grid"], categories=cats)
NT = P["grid"] ** 2
tcfg = data.DataConfig(grid=P["grid"], cell_size=128 // P["grid"], categories=cats)

# -- several question/answer turns per image (turns=K): the sample's own question first (the test
# distribution), then K-1 more questions asked of the same scene, answered from its cells.
def scene_qa(rng, cells, g):
    """One (question, answer) about the scene `cells` (row-major cell classes), any category."""
    objs = {}
    for i, c in enumerate(cells):
        d = data.describe_cell(c)
        if d[0] == "object":
            objs[(data.SHAPES.index(d[1]), data.COLOR_NAMES.index(d[2]))] = divmod(i, g)
    glyphs = [(i, data.describe_cell(c)[1]) for i, c in enumerate(cells) if data.describe_cell(c)[0] == "glyph"]
    S, C, SH, CO = len(data.SHAPES), len(data.COLORS), data.SHAPES, data.COLOR_NAMES
    for _ in range(20):
        cat = rng.choice(data.CATEGORIES)
        if cat == "exist":
            if objs and rng.random() < 0.5:
                s, c = rng.choice(list(objs))
                return f"Is there a {CO[c]} {SH[s]}?", "yes"
            s, c = rng.randrange(S), rng.randrange(C)
            return f"Is there a {CO[c]} {SH[s]}?", "yes" if (s, c) in objs else "no"
        if cat == "count":
            if rng.random() < 0.5:
                s = rng.randrange(S); n = sum(k[0] == s for k in objs)
                q = f"How many {data.PLURALS[s]} are there?"
            else:
                c = rng.randrange(C); n = sum(k[1] == c for k in objs)
                q = f"How many {CO[c]} objects are there?"
            if n <= dcfg.max_count:
                return q, str(n)
        if cat == "color":
            once = [k for k in objs if sum(j[0] == k[0] for j in objs) == 1]
            if once:
                s, c = rng.choice(once)
                return f"What color is the {SH[s]}?", CO[c]
        if cat == "shape":
            once = [k for k in objs if sum(j[1] == k[1] for j in objs) == 1]
            if once:
                s, c = rng.choice(once)
                return f"What shape is the {CO[c]} object?", SH[s]
        if cat == "position" and len(objs) >= 2:
            a, b = rng.sample(list(objs), 2)
            rel = rng.randrange(len(data.RELATIONS))
            (ra, ca), (rb, cb) = objs[a], objs[b]
            ka, kb = (ca, cb) if rel < 2 else (ra, rb)
            if ka != kb:
                truth = ka < kb if rel in (0, 2) else ka > kb
                return (f"Is the {CO[a[1]]} {SH[a[0]]} {data.RELATIONS[rel]} the {CO[b[1]]} {SH[b[0]]}?",
                        "yes" if truth else "no")
        if cat == "text" and glyphs:
            return "What does the text say?", "".join(ch for _, ch in glyphs)
        if cat == "reason":
            if rng.random() < 0.5:
                s1, s2 = rng.sample(range(S), 2)
                n1, n2 = (sum(k[0] == x for k in objs) for x in (s1, s2))
                q = f"Are there more {data.PLURALS[s1]} than {data.PLURALS[s2]}?"
            else:
                c1, c2 = rng.sample(range(C), 2)
                n1, n2 = (sum(k[1] == x for k in objs) for x in (c1, c2))
                q = f"Are there more {CO[c1]} objects than {CO[c2]} objects?"
            if n1 != n2:
                return q, "yes" if n1 > n2 else "no"
    s, c = rng.randrange(S), rng.randrange(C)
    return f"Is there a {CO[c]} {SH[s]}?", "yes" if (s, c) in objs else "no"


def multi_turn(samples, turns, seed):
    """collate(), then extra turns appended to each row: <|im_start|>user\n{q}<|im_end|>
    <|im_start|>assistant\n{a}<|im_end|>, answers (and their <|im_end|>) supervised."""
    import random
    tok = data.TOKENIZER
    b = data.collate(samples, n_image_tokens=NT)
    rows = []
    for k, smp in enumerate(samples):
        n = int(b["attention_mask"][k].sum())
        ids, lab = b["input_ids"][k, :n].tolist(), b["labels"][k, :n].tolist()
        rng = random.Random(f"turns/{seed}/{k}")
        for _ in range(turns - 1):
            q, a = scene_qa(rng, smp.cells, P["grid"])
            head = [tok.im_start_id] + tok.encode("user\n" + q) + [tok.im_end_id, tok.im_start_id] + tok.encode("assistant\n")
            ans = tok.encode(a) + [tok.im_end_id]
            ids += head + ans
            lab += [data.IGNORE_INDEX] * len(head) + ans
        rows.append((ids, lab))
    T = max(len(i) for i, _ in rows)
    b["input_ids"] = torch.tensor([i + [tok.pad_id] * (T - len(i)) for i, _ in rows])
    b["labels"] = torch.tensor([l + [data.IGNORE_INDEX] * (T - len(l)) for _, l in rows])
    return b


class Steps(torch.utils.data.Dataset):
    def __len__(self): return P["steps"]
    def __getitem__(self, s):
        smp = [data.sample_at(dcfg, "train", 0, s * P["bs"] + i) for i in range(P["bs"])]
        if P["turns"] > 1:
            return multi_turn(smp, P["turns"], s)
        return data.collate(smp, n_image_tokens=NT)

torch.manual_seed(P["seed"])
model = Model(ModelConfig(vocab_size=data.VOCAB_SIZE, img_context_id=data.IMG_CONTEXT_ID, patch_size=P["patch"], hidden_size=P["hidden"], n_heads=P["heads"])).to(dev)
D = model.cfg.hidden_size
if P["aux"] == "fact":
    heads = nn.ModuleList([nn.Linear(D, n + 1, bias=False)
                           for n in (len(data.SHAPES), len(data.COLORS), len(data.GLYPHS))]).to(dev)
else:
    heads = nn.ModuleList([nn.Linear(D, data.NUM_CELL_CLASSES, bias=False)]).to(dev)
# factorised targets of each cell class: shape (0 = none), colour (0 = none), glyph (0 = none)
fact = torch.zeros(3, data.NUM_CELL_CLASSES, dtype=torch.long)
for c in range(1, data.NUM_CELL_CLASSES):
    d = data.describe_cell(c)
    if d[0] == "object":
        fact[0, c], fact[1, c] = data.SHAPES.index(d[1]) + 1, data.COLOR_NAMES.index(d[2]) + 1
    else:
        fact[2, c] = data.GLYPHS.index(d[1]) + 1
fact = fact.to(dev)

# the optimiser and schedule of distill.py (AdamW, decay on matrices only; warmup-stable-decay)
opt_cfg = DistillConfig(stage=0, steps=P["steps"], lr=P["lr"], batch_size=P["bs"], weight_decay=P["wd"],
                         grad_clip=P["clip"], warmup_frac=P["warm"], decay_frac=P["decay"])
trained = nn.ModuleList([model, heads])
params = list(trained.parameters())
opt = make_optimizer(trained, opt_cfg)
for g in opt.param_groups:
    g["betas"] = (0.9, P["b2"])

def aux_loss(feats, cells):
    valid = cells != data.IGNORE_INDEX
    c = cells.clamp_min(0)
    f = F.normalize(feats, dim=-1)
    if P["aux"] == "none":
        return feats.sum() * 0
    if P["aux"] == "lin":
        return F.cross_entropy(heads[0](feats)[valid].float(), cells[valid])
    if P["aux"] == "cos":
        lg = P["scale"] * f @ F.normalize(heads[0].weight, dim=-1).T
        return F.cross_entropy(lg[valid].float(), cells[valid])
    tot = 0
    for h, t in zip(heads, fact):
        lg = P["scale"] * f @ F.normalize(h.weight, dim=-1).T
        tot = tot + F.cross_entropy(lg[valid].float(), t[c][valid])
    return tot

test = [data.sample_at(tcfg, "test", 0, i) for i in range(len(cats) * 60)]
tb = [data.collate(test[i:i + 140], n_image_tokens=NT) for i in range(0, len(test), 140)]

@torch.no_grad()
def tf_eval():
    model.eval()
    hits = {c: 0 for c in cats}; n = {c: 0 for c in cats}
    for b in tb:
        ids = b["input_ids"].to(dev); lab = b["labels"].to(dev)
        lg = model(ids, b["pixel_values"].to(dev))
        pred = lg[:, :-1].argmax(-1); tgt = lab[:, 1:]
        ok = ((pred == tgt) | (tgt == data.IGNORE_INDEX)).all(-1)
        for k, c in enumerate(b["category"]):
            hits[c] += int(ok[k]); n[c] += 1
    model.train()
    acc = {c: hits[c] / n[c] for c in hits}
    return acc, sum(acc.values()) / len(acc)

loader = torch.utils.data.DataLoader(Steps(), batch_size=None, num_workers=P["workers"], prefetch_factor=4,
                                     persistent_workers=True)
t0 = time.time(); ce_avg = aux_avg = None
for s, b in enumerate(loader):
    for g in opt.param_groups: g["lr"] = wsd_lr(s, opt_cfg)
    ids, lab = b["input_ids"].to(dev, non_blocking=True), b["labels"].to(dev)
    feats = model.vision_features(b["pixel_values"].to(dev))
    lg = model(ids, image_embeds=feats)
    ce_sum, n_ans = answer_ce(lg, lab)
    ce = ce_sum / n_ans.clamp_min(1)
    aux = aux_loss(feats, b["cells"].to(dev))
    loss = ce + P["aux_w"] * aux
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(params, P["clip"]); opt.step()
    ce_avg = ce.item() if ce_avg is None else 0.98 * ce_avg + 0.02 * ce.item()
    aux_avg = aux.item() if aux_avg is None else 0.98 * aux_avg + 0.02 * aux.item()
    if (s + 1) % P["eval_every"] == 0 or s + 1 == P["steps"]:
        acc, mean = tf_eval()
        say(f"step {s+1} t={time.time()-t0:.0f}s ce={ce_avg:.3f} aux={aux_avg:.3f} mean={100*mean:.1f} "
            + " ".join(f"{c[:3]}={100*a:.0f}" for c, a in acc.items()))
    if time.time() - t0 > 60 * P["minutes"]:
        say(f"time limit at step {s+1}"); break
if P["save"]:
    torch.save(model.state_dict(), os.path.join(out, f"{name}.pt"))
say("done")
