"""The feature table's columns: names and one-line definitions (:data:`FEATURE_DOCS`), and the constants every
part of :mod:`simmerge_lib.features` shares."""

from __future__ import annotations

#: Bump when a feature's definition changes: cached feature tables of another version are recomputed
#: (3: the top-k features count TIES's kept entries as the operator does, ``k = int(density * n)``).
FEATURE_VERSION = 3
#: Bump when what :func:`~simmerge_lib.features.probing.run_probes` computes changes: cached probe outputs of
#: another version are recomputed.
PROBE_VERSION = 2
#: Share of each task vector's entries TIES keeps (mergekit's default density).
TIES_DENSITY = 0.2
ID_COLUMNS = ["a", "b", "task", "same_base", "task_of_a"]

FEATURE_DOCS: dict[str, str] = {
    # --- functional: next-token distributions at every non-pad prompt position -------------------------------
    "fn_kl_mean": "mean over probe positions of KL(p_a || p_b) = sum_v p_a(v) log(p_a(v)/p_b(v)) (nats)",
    "fn_kl_median": "median over probe positions of KL(p_a || p_b)",
    "fn_kl_q10": "10th percentile over probe positions of KL(p_a || p_b)",
    "fn_kl_q90": "90th percentile over probe positions of KL(p_a || p_b)",
    "fn_js_mean": "mean Jensen-Shannon divergence 1/2 KL(p_a||m) + 1/2 KL(p_b||m), m = (p_a+p_b)/2, in bits (0..1)",
    "fn_top1_agree": "share of probe positions where argmax p_a = argmax p_b",
    "fn_entropy_gap": "(mean H(p_a) - mean H(p_b)) / log V: signed entropy difference as a share of the maximum",
    # --- functional: hidden states (embedding output + every block), layer by layer -------------------------
    "fn_cka_mean": "mean over layers of linear CKA(H_a, H_b) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred",
    "fn_cka_min": "minimum over layers of linear CKA",
    "fn_cka_slope": "least-squares slope of linear CKA against relative depth (0 = embeddings, 1 = last layer)",
    "fn_hidden_cos_mean": "mean over layers of the mean per-position cosine of hidden states (NaN if widths differ)",
    "fn_hidden_cos_min": "minimum over layers of the mean per-position hidden-state cosine (NaN if widths differ)",
    "fn_hidden_cos_slope": "slope of the per-layer hidden-state cosine against relative depth (NaN if widths differ)",
    # --- functional: attention patterns ------------------------------------------------------------------------
    "fn_attn_cos_mean": "mean over layers of the cosine of head-averaged attention weights over valid (query, key)",
    "fn_attn_cos_min": "minimum over layers of the head-averaged attention-pattern cosine",
    # --- functional: where the answer starts (each probe's last position), relative to the bases ---------------
    "fn_kl_answer": "mean over probes of KL(p_a || p_b) at the position that predicts the answer's first token",
    "fn_top1_answer": "share of probes whose first answer token is the same argmax under a and b",
    "fn_a_base_kl": "mean KL(p_a || p_base_a) at the answer position: how far a's task vector moves this task's "
                    "outputs",
    "fn_b_base_kl": "mean KL(p_b || p_base_b) at the answer position: how far b's task vector moves them",
    "fn_delta_cos": "cosine of the two moves, (log p_a - log p_base_a) and (log p_b - log p_base_b), over the answer "
                    "positions × vocabulary: do the task vectors push this task's outputs the same way?",
    "fn_base_entropy": "mean entropy of p_base_a at the answer position / log V: how unsure the base is on this task "
                       "(describes the task, compares nothing)",
    # --- structural: task vectors tau = theta_expert - theta_own_base, all shared tensors -------------------
    "st_tv_cos": "cosine of the task vectors <tau_a, tau_b> / (||tau_a|| ||tau_b||), over all shared tensors",
    "st_tv_dist": "||tau_a - tau_b|| / (||tau_a|| + ||tau_b||): normalised L2 distance (0 = equal, 1 = opposite)",
    "st_tv_norm_ratio": "||tau_a|| / ||tau_b||",
    "st_tv_norm_balance": "min(||tau_a||, ||tau_b||) / max(||tau_a||, ||tau_b||) (symmetric, 0..1)",
    "st_rel_norm_a": "||tau_a|| / ||theta_base_a||: how far a moved from its base, relative to the base's size",
    "st_rel_norm_b": "||tau_b|| / ||theta_base_b||",
    "st_sign_conflict": "share of entries, among those where both tau are non-zero, whose signs differ",
    "st_support_overlap": "Jaccard overlap of the supports (non-zero entries) of tau_a and tau_b: did they train the "
                          "same parameters?",
    "st_topk_jaccard": "Jaccard overlap |K_a ∩ K_b| / |K_a ∪ K_b| of the per-tensor top-20% magnitude masks TIES "
                       "keeps",
    "st_ties_conflict": "share of entries kept by both TIES masks whose signs differ (what TIES's sign election drops)",
    "st_tv_cos_attn": "task-vector cosine over attention tensors",
    "st_tv_cos_mlp": "task-vector cosine over MLP tensors",
    "st_tv_cos_embed": "task-vector cosine over embedding and output-head tensors",
    "st_tv_cos_early": "task-vector cosine over the first third of the blocks",
    "st_tv_cos_mid": "task-vector cosine over the middle third of the blocks",
    "st_tv_cos_late": "task-vector cosine over the last third of the blocks",
    "st_layer_cos_mean": "mean over blocks of the per-block task-vector cosine",
    "st_layer_cos_min": "minimum over blocks of the per-block task-vector cosine",
    "st_layer_cos_std": "standard deviation over blocks of the per-block task-vector cosine",
    "st_layer_cos_slope": "slope of the per-block task-vector cosine against relative depth",
    "st_layer_conflict_max": "maximum over blocks of the per-block sign-conflict rate",
    "st_weight_cos": "cosine of the full weights <theta_a, theta_b> / (||theta_a|| ||theta_b||)",
    "st_base_cos": "cosine of the two bases' weights (1 when a and b share their base)",
    "st_base_dist": "||theta_base_a - theta_base_b|| / (||theta_base_a|| + ||theta_base_b||) (0 when shared)",
    "st_shared_frac": "share of a's parameters in tensors whose name and shape agree in all four checkpoints",
}
FEATURE_COLUMNS = list(FEATURE_DOCS)
#: Features that describe the task (through the base's behaviour on its probes) without comparing two models.
DESCRIPTOR_COLUMNS = ["fn_base_entropy"]
FUNCTIONAL_COLUMNS = [c for c in FEATURE_COLUMNS if c.startswith("fn_")]
STRUCTURAL_COLUMNS = [c for c in FEATURE_COLUMNS if c.startswith("st_")]
# Structural features that change under swapping a and b; every other one is symmetric.
_SWAP_INVERT = {"st_tv_norm_ratio"}
_SWAP_EXCHANGE = {"st_rel_norm_a": "st_rel_norm_b", "st_rel_norm_b": "st_rel_norm_a"}

NAN = float("nan")
