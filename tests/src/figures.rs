//! The benchmark figures and their goals (BENCHMARKS.md), and the guard CI runs over a smoke
//! run: a figure fails when it falls below **half its goal** — generous on purpose, so that a
//! 2× regression is caught on a noisy shared machine and noise is not.
//!
//! Every scenario of `hmr-bench` and `bench/trigger_overhead.sh` appends its figures to the
//! file named by `HMR_BENCH_FIGURES`, one per line: `name<TAB>value`. The goals live here,
//! once, so the guard and the results file cannot disagree about them.

use std::fmt::Write as _;
use std::io::Write as _;

/// Which way a figure is good.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    /// A rate: at least this much. Half the goal is the CI threshold.
    AtLeast(f64),
    /// A time: at most this much. Twice the goal is the CI threshold.
    AtMost(f64),
    /// A ratio to a baseline (1.00 = the baseline's cost): at most this. The threshold doubles
    /// the overhead above 1 (1.05× → 1.10×).
    RatioAtMost(f64),
    /// A time whose goal this machine cannot reach for a reason outside the code (what bounds
    /// it is written in BENCHMARKS.md): shown against the goal, never failing the guard.
    Reported(f64),
}

impl Goal {
    /// The value below (or above) which CI fails.
    pub fn threshold(self) -> f64 {
        match self {
            Goal::AtLeast(g) => g / 2.0,
            Goal::AtMost(g) => g * 2.0,
            Goal::RatioAtMost(g) => 1.0 + 2.0 * (g - 1.0),
            Goal::Reported(_) => f64::INFINITY,
        }
    }

    fn meets(self, bound: f64, v: f64) -> bool {
        match self {
            Goal::AtLeast(_) => v >= bound,
            Goal::AtMost(_) | Goal::RatioAtMost(_) | Goal::Reported(_) => v <= bound,
        }
    }

    fn goal(self) -> f64 {
        match self {
            Goal::AtLeast(g) | Goal::AtMost(g) | Goal::RatioAtMost(g) | Goal::Reported(g) => g,
        }
    }

    pub fn goal_met(self, v: f64) -> bool {
        self.meets(self.goal(), v)
    }

    pub fn guard_holds(self, v: f64) -> bool {
        self.meets(self.threshold(), v)
    }

    fn show(self, unit: &str) -> String {
        match self {
            Goal::AtLeast(g) => format!("≥ {} {unit}", num(g)),
            Goal::AtMost(g) | Goal::Reported(g) => format!("< {} {unit}", num(g)),
            Goal::RatioAtMost(g) => format!("≤ {}×", num(g)),
        }
    }

    fn show_threshold(self, unit: &str) -> String {
        match self {
            Goal::AtLeast(_) => format!("≥ {} {unit}", num(self.threshold())),
            Goal::AtMost(_) => format!("< {} {unit}", num(self.threshold())),
            Goal::RatioAtMost(_) => format!("≤ {}×", num(self.threshold())),
            Goal::Reported(_) => "reported, not guarded".into(),
        }
    }
}

/// A headline figure: its name in the figures file, what it says, its unit and goal.
pub struct Spec {
    pub name: &'static str,
    pub what: &'static str,
    pub unit: &'static str,
    pub goal: Goal,
}

/// Every headline figure of BENCHMARKS.md's summary (issue #26), in the summary's order.
pub const SPECS: &[Spec] = &[
    Spec {
        name: "capture_insert_ratio",
        what:
            "capture: hmr trigger ÷ bare INSERT, best rounds (reported: within this machine's noise, BENCHMARKS.md §1)",
        unit: "×",
        goal: Goal::Reported(1.05),
    },
    Spec {
        name: "capture_vs_cheapest_other",
        what: "capture: hmr ÷ the cheapest of PgQ and a plain PL/pgSQL outbox, INSERT, best rounds",
        unit: "×",
        goal: Goal::RatioAtMost(1.0),
    },
    Spec {
        name: "drain_patients_per_s",
        what: "drain: patients, batches of 500",
        unit: "/s",
        goal: Goal::AtLeast(10_000.0),
    },
    Spec {
        name: "drain_lab_reports_per_s",
        what: "drain: lab reports (data)",
        unit: "/s",
        goal: Goal::AtLeast(3_000.0),
    },
    Spec {
        name: "drain_lab_reports_pdf_per_s",
        what: "drain: lab reports with a rendered PDF each",
        unit: "/s",
        goal: Goal::AtLeast(1_000.0),
    },
    Spec {
        name: "worker_rss_mb",
        what: "worker peak RSS (drain with PDFs)",
        unit: "MB",
        goal: Goal::AtMost(50.0),
    },
    Spec {
        name: "latency_300_p99_ms",
        what: "commit → platform p99 at 300/s",
        unit: "ms",
        goal: Goal::AtMost(25.0),
    },
    Spec {
        name: "latency_1000_p99_ms",
        what: "commit → platform p99 at 1,000/s",
        unit: "ms",
        goal: Goal::AtMost(100.0),
    },
    Spec {
        name: "sql_check_overhead_ms",
        what: "SQL overhead over the platform call, check, p50",
        unit: "ms",
        goal: Goal::AtMost(0.5),
    },
    Spec {
        name: "sql_list_overhead_ms",
        what: "SQL overhead over the platform call, list, p50",
        unit: "ms",
        goal: Goal::AtMost(0.5),
    },
    Spec {
        name: "sql_decision_overhead_ms",
        what: "SQL overhead of recording a decision over asking the platform for the check's page decisions, p50",
        unit: "ms",
        goal: Goal::AtMost(0.5),
    },
    Spec {
        name: "fdw_poll_ms",
        what: "a poll through mysql_fdw that finds 10 changes (1,000,000 patients / 10,000,000 result lines), p50",
        unit: "ms",
        goal: Goal::AtMost(50.0),
    },
    Spec {
        name: "fdw_rows_read_per_poll",
        what: "rows MariaDB reads for a poll that finds 10 changes (the changes and those within the lookback), p50",
        unit: "rows",
        goal: Goal::AtMost(30.0),
    },
    Spec {
        name: "fdw_deliver_round_ms",
        what: "through mysql_fdw, from the polls to the last of 10 corrected reports (and their 10 patients) delivered, p50",
        unit: "ms",
        goal: Goal::AtMost(1000.0),
    },
    Spec {
        name: "fdw_rows_read_per_report",
        what: "rows MariaDB reads per report delivered (polls, patient, header, 10 result lines, identity, un-audit check), p50",
        unit: "rows",
        goal: Goal::AtMost(50.0),
    },
    Spec {
        name: "cold_first_call_ms",
        what: "a new backend's first list call, p50",
        unit: "ms",
        goal: Goal::AtMost(10.0),
    },
    Spec {
        name: "sessions_200x5_spread_p99_ms",
        what: "200 new sessions × 5 list calls spread over 10 s, p99",
        unit: "ms",
        goal: Goal::AtMost(100.0),
    },
    Spec {
        name: "sessions_200x5_p99_ms",
        what: "200 sessions × 5 list calls all at once, p99 (bounded by the 2 cores: BENCHMARKS.md §4)",
        unit: "ms",
        goal: Goal::Reported(100.0),
    },
    Spec {
        name: "hook_order_sign_overhead_ms",
        what: "hook overhead over the platform call, order-sign (ES384), p50",
        unit: "ms",
        goal: Goal::AtMost(1.0),
    },
    Spec {
        name: "hook_patient_view_overhead_ms",
        what: "hook overhead over the platform call, patient-view (ES384), p50",
        unit: "ms",
        goal: Goal::AtMost(1.0),
    },
    Spec {
        name: "backlog_events_per_s",
        what: "backlog after an outage drained (1,000,000 in 5 min = 3,334/s)",
        unit: "/s",
        goal: Goal::AtLeast(3_334.0),
    },
];

pub fn spec(name: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.name == name)
}

/// Appends a figure to the file named by `HMR_BENCH_FIGURES` (nothing when unset).
pub fn record(name: &str, value: f64) {
    debug_assert!(spec(name).is_some(), "unknown figure {name}");
    if let Ok(path) = std::env::var("HMR_BENCH_FIGURES") {
        let line = format!("{name}\t{value}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("cannot append to {path}: {e}");
        }
    }
}

/// Reads a figures file: the last value of each name (a scenario run twice counts once).
pub fn parse(text: &str) -> Result<Vec<(String, f64)>, String> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (name, value) = line
            .split_once('\t')
            .ok_or_else(|| format!("line {}: not name<TAB>value: {line:?}", n + 1))?;
        let value: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("line {}: {value:?} is not a number", n + 1))?;
        if spec(name).is_none() {
            return Err(format!("line {}: unknown figure {name:?}", n + 1));
        }
        out.retain(|(k, _)| k != name);
        out.push((name.to_string(), value));
    }
    Ok(out)
}

/// What the guard found: the table (Markdown) and the figures that failed or are missing.
pub struct Verdict {
    pub table: String,
    pub failed: Vec<String>,
    pub missing: Vec<String>,
}

/// Each figure next to its goal and its CI threshold. Figures absent from `measured` are
/// listed as missing (a scenario that did not run is a failure of the guard, not a pass).
pub fn judge(measured: &[(String, f64)]) -> Verdict {
    let mut table = String::from(
        "| figure | measured | goal | CI threshold (half the goal) | goal met | guard |\n|---|---|---|---|---|---|\n",
    );
    let (mut failed, mut missing) = (Vec::new(), Vec::new());
    for s in SPECS {
        match measured.iter().find(|(n, _)| n == s.name) {
            Some(&(_, v)) => {
                let holds = s.goal.guard_holds(v);
                if !holds {
                    failed.push(s.name.to_string());
                }
                let _ = writeln!(
                    table,
                    "| {} | {} {} | {} | {} | {} | {} |",
                    s.what,
                    num(v),
                    s.unit,
                    s.goal.show(s.unit),
                    s.goal.show_threshold(s.unit),
                    if s.goal.goal_met(v) { "met" } else { "not met" },
                    if holds { "ok" } else { "**FAIL**" }
                );
            }
            None => {
                missing.push(s.name.to_string());
                let _ = writeln!(
                    table,
                    "| {} | — | {} | {} | — | **MISSING** |",
                    s.what,
                    s.goal.show(s.unit),
                    s.goal.show_threshold(s.unit)
                );
            }
        }
    }
    Verdict { table, failed, missing }
}

/// A number as a person reads it: rates without decimals, small times with two.
fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_half_the_goal() {
        assert_eq!(Goal::AtLeast(10_000.0).threshold(), 5_000.0);
        assert_eq!(Goal::AtMost(25.0).threshold(), 50.0);
        assert!((Goal::RatioAtMost(1.05).threshold() - 1.10).abs() < 1e-9);
        assert!(Goal::AtLeast(10_000.0).guard_holds(5_000.0));
        assert!(!Goal::AtLeast(10_000.0).guard_holds(4_999.0));
        assert!(!Goal::AtLeast(10_000.0).goal_met(9_999.0));
        assert!(Goal::AtMost(0.5).guard_holds(0.99));
        assert!(!Goal::AtMost(0.5).guard_holds(1.01));
        assert!(!Goal::RatioAtMost(1.05).guard_holds(1.11));
        assert!(Goal::RatioAtMost(1.05).guard_holds(1.09));
        // A reported figure shows whether its goal is met and never fails the guard.
        assert!(Goal::Reported(100.0).guard_holds(5_000.0));
        assert!(!Goal::Reported(100.0).goal_met(5_000.0));
    }

    #[test]
    fn a_regression_a_missing_figure_and_a_bad_line_fail() {
        let all: String = SPECS
            .iter()
            .map(|s| {
                let v = s.goal.goal();
                format!("{}\t{v}\n", s.name)
            })
            .collect();
        let v = judge(&parse(&all).unwrap());
        assert!(v.failed.is_empty() && v.missing.is_empty(), "{}", v.table);
        // The drain 10× slower, as issue #26 found it.
        let slow = format!("{all}drain_patients_per_s\t1090\n");
        let v = judge(&parse(&slow).unwrap());
        assert_eq!(v.failed, ["drain_patients_per_s"]);
        assert!(
            v.table.contains(
                "| drain: patients, batches of 500 | 1090 /s | ≥ 10000 /s | ≥ 5000 /s | not met | **FAIL** |"
            ),
            "{}",
            v.table
        );
        let without: String = all
            .lines()
            .filter(|l| !l.starts_with("hook_"))
            .map(|l| format!("{l}\n"))
            .collect();
        let v = judge(&parse(&without).unwrap());
        assert_eq!(
            v.missing,
            ["hook_order_sign_overhead_ms", "hook_patient_view_overhead_ms"]
        );
        assert!(parse("drain_patients_per_s 12\n").is_err());
        assert!(parse("nonsense\t12\n").is_err());
        assert!(parse("drain_patients_per_s\tfast\n").is_err());
    }
}
