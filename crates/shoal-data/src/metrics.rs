//! Scores of binary predictions: AUC (ties counted half, as the Mann-Whitney statistic
//! and scikit-learn's `roc_auc_score` count them) and log loss.

/// Area under the ROC curve of `scores` against 0/1 `labels`; None when one class is
/// absent (the AUC is undefined).
pub fn auc(scores: &[f32], labels: &[f32]) -> Option<f64> {
    assert_eq!(
        scores.len(),
        labels.len(),
        "auc: scores and labels differ in length"
    );
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let pos = labels.iter().filter(|&&l| l > 0.5).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    // Sum of the positives' ranks (1-based), tied groups taking their mean rank.
    let mut rank_sum = 0.0f64;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        let p = idx[i..=j].iter().filter(|&&k| labels[k] > 0.5).count() as f64;
        rank_sum += p * mean_rank;
        i = j + 1;
    }
    Some((rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

/// Mean binary cross-entropy of probabilities `probs` (clipped to [1e-7, 1 - 1e-7]).
pub fn logloss(probs: &[f32], labels: &[f32]) -> f64 {
    assert_eq!(probs.len(), labels.len(), "logloss: lengths differ");
    if probs.is_empty() {
        return f64::NAN;
    }
    let s: f64 = probs
        .iter()
        .zip(labels)
        .map(|(&p, &y)| {
            let p = (p as f64).clamp(1e-7, 1.0 - 1e-7);
            if y > 0.5 {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum();
    s / probs.len() as f64
}
