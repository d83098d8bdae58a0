//! Pinning the threads of [`Gateway::spawn_threads`](super::Gateway::spawn_threads) to
//! CPUs ([`CpuAffinity`]).
//!
//! With one thread per core left to the scheduler, two gateway threads now and then share
//! a core while another core runs the processes around them; each then waits a whole
//! scheduler tick behind the other, and those waits are the tail latency. On a 2-core
//! machine shared with the load client and an upstream (`benches/wrk_vs_nginx.sh`, 2
//! workers), unpinned threads answered with a p99 of 2.6–4.0 ms in most runs; pinned, 0.5–0.65
//! ms. nginx's `worker_cpu_affinity auto` does the same for its workers.

/// Whether [`Gateway::spawn_threads`](super::Gateway::spawn_threads) pins its threads to
/// CPUs (Linux; elsewhere threads are never pinned).
///
/// "The CPUs the process may run on" are the calling thread's affinity mask when the
/// threads are spawned (`sched_getaffinity`: what `taskset` or a container's cpuset
/// allows), in ascending order. A thread's blocking pool (used, for instance, to resolve
/// an upstream's host name) is not pinned: it may run on any of those CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CpuAffinity {
    /// One thread per CPU: when there are exactly as many threads as CPUs the process may
    /// run on, thread *i* is pinned to the *i*-th of them; with any other count, placement
    /// is left to the operating system (a gateway given fewer threads than the machine
    /// has cores shares them with other work, which the scheduler balances better than
    /// a fixed placement would). The default.
    #[default]
    Auto,
    /// Thread *i* is pinned to the (*i* mod *n*)-th of the *n* CPUs the process may run
    /// on, whatever the count.
    Pin,
    /// No thread is pinned.
    Off,
}

/// The CPU each of `threads` threads is to be pinned to, given the CPUs the process may
/// run on (`allowed`, ascending).
pub(crate) fn assign(
    affinity: CpuAffinity,
    threads: usize,
    allowed: &[usize],
) -> Vec<Option<usize>> {
    let pin = match affinity {
        CpuAffinity::Off => false,
        CpuAffinity::Auto => threads == allowed.len(),
        CpuAffinity::Pin => !allowed.is_empty(),
    };
    (0..threads)
        .map(|i| pin.then(|| allowed[i % allowed.len()]))
        .collect()
}

/// The CPUs the calling thread may run on, ascending; empty when they cannot be read
/// (never pinned then).
#[cfg(target_os = "linux")]
pub(crate) fn allowed() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    use nix::unistd::Pid;
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .collect(),
        Err(_e) => {
            #[cfg(feature = "tracing")]
            tracing::warn!(
                target: "seawall::gateway",
                error = %_e,
                "cannot read the CPUs this process may run on: gateway threads are not pinned"
            );
            Vec::new()
        }
    }
}

/// Elsewhere than Linux: nothing to pin to.
#[cfg(not(target_os = "linux"))]
pub(crate) fn allowed() -> Vec<usize> {
    Vec::new()
}

/// Confines the calling thread to `cpus`.
#[cfg(target_os = "linux")]
pub(crate) fn confine(cpus: &[usize]) -> std::io::Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).map_err(std::io::Error::from)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).map_err(std::io::Error::from)
}

/// Elsewhere than Linux: never called with a CPU ([`allowed`] is empty).
#[cfg(not(target_os = "linux"))]
pub(crate) fn confine(_cpus: &[usize]) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pins_one_thread_per_allowed_cpu_only() {
        let allowed = [0, 2, 5];
        assert_eq!(
            assign(CpuAffinity::Auto, 3, &allowed),
            [Some(0), Some(2), Some(5)]
        );
        assert_eq!(assign(CpuAffinity::Auto, 2, &allowed), [None, None]);
        assert_eq!(assign(CpuAffinity::Auto, 4, &allowed), [None; 4]);
        assert_eq!(assign(CpuAffinity::Auto, 1, &[]), [None]);
    }

    #[test]
    fn pin_wraps_and_off_never_pins() {
        let allowed = [1, 3];
        assert_eq!(
            assign(CpuAffinity::Pin, 3, &allowed),
            [Some(1), Some(3), Some(1)]
        );
        assert_eq!(assign(CpuAffinity::Pin, 2, &[]), [None, None]);
        assert_eq!(assign(CpuAffinity::Off, 2, &allowed), [None, None]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn confines_the_calling_thread() {
        let all = allowed();
        assert!(!all.is_empty());
        let first = all[0];
        std::thread::spawn(move || {
            confine(&[first]).unwrap();
            assert_eq!(allowed(), [first]);
            confine(&all).unwrap();
            assert_eq!(allowed(), all);
        })
        .join()
        .unwrap();
    }
}
