//! The progress primitive of every long display (training steps, images scored,
//! sentences translated): a bar on a terminal, a plain line every few seconds otherwise
//! (logs, CI), both counting what will actually run and estimating the time left from
//! the work done so far.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// A bar over the units of some work on a terminal (a plain line every few seconds
/// otherwise), with lines printed above it: what the workloads' displays share.
///
/// The total is what will run (a step limit already applied); a time limit, when the
/// work has one, caps the estimate of the time left. The estimate comes from the units
/// done since [`StepBar::start_at`], so a resumed run or a slow first unit does not skew
/// it for long.
pub struct StepBar {
    bar: Option<ProgressBar>,
    last_line: Instant,
    every: Duration,
    started: Instant,
    first: u64,
    total: u64,
    limit: Option<Duration>,
    quiet: bool,
}

impl StepBar {
    pub fn new() -> Self {
        Self {
            bar: None,
            last_line: Instant::now(),
            every: Duration::from_secs(10),
            started: Instant::now(),
            first: 0,
            total: 0,
            limit: None,
            quiet: false,
        }
    }

    /// A display that prints only what [`StepBar::say`] is given (no bar, no lines).
    pub fn quiet() -> Self {
        Self {
            quiet: true,
            ..Self::new()
        }
    }

    /// Starts the bar for `total` units from 0.
    pub fn start(&mut self, total: u64) {
        self.start_at(0, total, None);
    }

    /// Starts the bar at unit `first` of `total` (0: not known), the work stopping after
    /// `limit` at the latest.
    pub fn start_at(&mut self, first: u64, total: u64, limit: Option<Duration>) {
        self.started = Instant::now();
        self.last_line = self.started;
        self.first = first;
        self.total = total;
        self.limit = limit;
        if !self.quiet && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(
                (total > 0).then_some(total),
                ProgressDrawTarget::stderr(),
            );
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {prefix}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(first);
            bar.set_prefix("?");
            self.bar = Some(bar);
        }
    }

    /// The estimated time left at unit `pos`: the rate of the units done so far over
    /// what is left of the total, capped by the time limit; `None` before the first unit
    /// (or with neither a total nor a limit).
    pub fn eta(&self, pos: u64) -> Option<Duration> {
        eta(
            pos.saturating_sub(self.first),
            self.total.saturating_sub(pos),
            self.total > 0,
            self.started.elapsed(),
            self.limit,
        )
    }

    /// Moves to unit `pos` with `msg` beside the count.
    pub fn step(&mut self, pos: u64, msg: String) {
        if self.quiet {
            return;
        }
        let eta = self.eta(pos).map_or_else(|| "?".to_string(), clock);
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(msg);
            b.set_prefix(eta);
        } else if self.last_line.elapsed() >= self.every {
            self.last_line = Instant::now();
            match self.total {
                0 => eprintln!("{pos} {msg} (left: {eta})"),
                t => eprintln!("{pos}/{t} {msg} (left: {eta})"),
            }
        }
    }

    /// Prints `line` above the bar (or as a line of its own).
    pub fn say(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Default for StepBar {
    fn default() -> Self {
        Self::new()
    }
}

/// The time left after `done` units in `elapsed` with `left` to go (`bounded`: the
/// total is known), capped by what is left of `limit`.
fn eta(
    done: u64,
    left: u64,
    bounded: bool,
    elapsed: Duration,
    limit: Option<Duration>,
) -> Option<Duration> {
    let by_rate = (bounded && done > 0)
        .then(|| Duration::from_secs_f64(elapsed.as_secs_f64() * left as f64 / done as f64));
    let by_limit = limit.map(|l| l.saturating_sub(elapsed));
    match (by_rate, by_limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `H:MM:SS` (or `M:SS` under an hour).
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    match s / 3600 {
        0 => format!("{}:{:02}", s / 60, s % 60),
        h => format!("{h}:{:02}:{:02}", (s / 60) % 60, s % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_counts_what_will_run() {
        let s = Duration::from_secs;
        // 10 of 60 steps in 20 s: 50 more at 2 s each.
        assert_eq!(eta(10, 50, true, s(20), None), Some(s(100)));
        // The same with 30 s of a one-minute limit left: the limit wins.
        assert_eq!(eta(10, 50, true, s(30), Some(s(60))), Some(s(30)));
        // Nothing done yet: only the limit says anything.
        assert_eq!(eta(0, 60, true, s(1), None), None);
        assert_eq!(eta(0, 60, true, s(1), Some(s(60))), Some(s(59)));
        // No total (a time-limited run): the limit alone.
        assert_eq!(eta(10, 0, false, s(5), Some(s(60))), Some(s(55)));
        // Past the limit: nothing left, not a negative time.
        assert_eq!(eta(10, 5, true, s(70), Some(s(60))), Some(s(0)));
        // The last step: done.
        assert_eq!(eta(60, 0, true, s(120), None), Some(s(0)));
    }

    #[test]
    fn clock_reads_as_a_person_writes_it() {
        assert_eq!(clock(Duration::from_secs(0)), "0:00");
        assert_eq!(clock(Duration::from_secs(334)), "5:34");
        assert_eq!(clock(Duration::from_secs(3600 + 61)), "1:01:01");
    }
}
