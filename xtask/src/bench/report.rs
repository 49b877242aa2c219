//! Medians and the markdown tables: each value with its ratio to no balancer and to the best
//! other balancer (the better of HAProxy and nginx) at the same thread count.

use std::{collections::BTreeMap, fmt::Write as _};

use super::{
    figures::{Figure, Sample},
    peers::Peer,
};

/// Every run's outcome, per figure, thread count and peer.
pub type Results = BTreeMap<(Figure, usize, Peer), Vec<Result<Sample, String>>>;

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// The per-metric medians of the successful runs.
pub fn medians(runs: &[Result<Sample, String>], metrics: usize) -> Option<Vec<f64>> {
    let ok: Vec<&Sample> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
    if ok.is_empty() {
        return None;
    }
    (0..metrics)
        .map(|i| median(ok.iter().map(|s| s.values[i]).collect()))
        .collect()
}

pub fn number(v: f64, decimals: usize) -> String {
    if decimals > 0 {
        return format!("{v:.decimals$}");
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn ratio(v: f64, reference: Option<f64>) -> String {
    match reference {
        Some(r) if r > 0.0 => format!("{:.2}", v / r),
        _ => "–".into(),
    }
}

/// One figure's table, then notes on failed runs and errors the load tool reported.
pub fn table(figure: Figure, threads: &[usize], peers: &[Peer], results: &Results) -> String {
    let metrics = figure.metrics();
    let peers: Vec<Peer> = peers
        .iter()
        .copied()
        .filter(|p| figure.applies_to(*p))
        .collect();
    let mut out = String::from("| peer | threads |");
    let mut rule = String::from("| --- | ---: |");
    for m in metrics {
        let _ = write!(out, " {} (vs none, vs best) |", m.name);
        rule.push_str(" ---: |");
    }
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    let mut notes = Vec::new();
    for &t in threads {
        let med: BTreeMap<Peer, Option<Vec<f64>>> = peers
            .iter()
            .map(|&p| {
                let runs = results
                    .get(&(figure, t, p))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                (p, medians(runs, metrics.len()))
            })
            .collect();
        let none = med.get(&Peer::None).cloned().flatten();
        let best: Vec<Option<f64>> = metrics
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let vals = med
                    .iter()
                    .filter(|(p, _)| p.is_other_balancer())
                    .filter_map(|(_, v)| v.as_ref().map(|v| v[i]));
                if m.higher_is_better {
                    vals.max_by(f64::total_cmp)
                } else {
                    vals.min_by(f64::total_cmp)
                }
            })
            .collect();
        for &p in &peers {
            let _ = write!(out, "| {} | {t} |", p.name());
            match &med[&p] {
                Some(v) => {
                    for (i, m) in metrics.iter().enumerate() {
                        let _ = write!(
                            out,
                            " {} ({}, {}) |",
                            number(v[i], m.decimals),
                            ratio(v[i], none.as_ref().map(|n| n[i])),
                            ratio(v[i], best[i])
                        );
                    }
                }
                None => {
                    for _ in metrics {
                        out.push_str(" failed |");
                    }
                }
            }
            out.push('\n');
            let runs = results
                .get(&(figure, t, p))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let failed: Vec<&String> = runs.iter().filter_map(|r| r.as_ref().err()).collect();
            if let Some(first) = failed.first() {
                notes.push(format!(
                    "{}, {t} thread(s): {} of {} runs failed; first: {}",
                    p.name(),
                    failed.len(),
                    runs.len(),
                    first.lines().next().unwrap_or("")
                ));
            }
            let noted: Vec<&str> = runs
                .iter()
                .filter_map(|r| r.as_ref().ok().and_then(|s| s.note.as_deref()))
                .collect();
            if !noted.is_empty() {
                notes.push(format!(
                    "{}, {t} thread(s): in {} of {} runs the load tool reported {}",
                    p.name(),
                    noted.len(),
                    runs.len(),
                    noted.join(" / ")
                ));
            }
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_numbers() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(number(1234567.4, 0), "1,234,567");
        assert_eq!(number(123.0, 0), "123");
        assert_eq!(number(0.1234, 2), "0.12");
        assert_eq!(ratio(1.0, Some(4.0)), "0.25");
        assert_eq!(ratio(1.0, None), "–");
    }
}
