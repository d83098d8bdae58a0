//! A registration that keeps itself alive, and goes away when the service does.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::client::ConsulClient;
use super::error::ConsulError;
use super::registration::{CheckStatus, ServiceRegistration};
use super::watch::{backoff, seed};
use crate::ConfigError;

/// How a [`RegistrationGuard`] keeps its registration alive.
///
/// ```
/// use std::time::Duration;
/// use seawall::consul::{CheckStatus, GuardConfig};
///
/// let config = GuardConfig::builder()
///     .heartbeat(Duration::from_secs(5))
///     .initial_status(CheckStatus::Warning, Some("warming up"))
///     .build()?;
/// # let _ = config;
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    heartbeat: Option<Duration>,
    initial_status: CheckStatus,
    initial_note: Option<String>,
    retry_base: Duration,
    verify_interval: Option<Duration>,
}

impl Default for GuardConfig {
    /// Heartbeats every third of the shortest TTL, starting passing; retries from 250 ms;
    /// registrations without TTL checks verified every 30 s.
    fn default() -> Self {
        Self {
            heartbeat: None,
            initial_status: CheckStatus::Passing,
            initial_note: None,
            retry_base: Duration::from_millis(250),
            verify_interval: Some(Duration::from_secs(30)),
        }
    }
}

impl GuardConfig {
    /// A builder starting from the [defaults](GuardConfig::default).
    pub fn builder() -> GuardConfigBuilder {
        GuardConfigBuilder {
            config: Self::default(),
        }
    }

    /// The heartbeat period for a registration with TTL checks.
    fn heartbeat_for(&self, registration: &ServiceRegistration) -> Option<Duration> {
        let shortest = registration.ttl_checks().map(|(_, ttl)| ttl).min()?;
        Some(
            self.heartbeat
                .unwrap_or(shortest / 3)
                .max(Duration::from_millis(1)),
        )
    }
}

/// Builds a [`GuardConfig`]; see [`GuardConfig::builder`].
#[derive(Debug, Clone)]
pub struct GuardConfigBuilder {
    config: GuardConfig,
}

impl GuardConfigBuilder {
    /// Sets how often TTL checks are reported (default: a third of the shortest TTL, so
    /// that two reports can be lost before the check lapses). It must be shorter than the
    /// shortest TTL: [`RegistrationGuard::register_with`] refuses it otherwise.
    #[must_use]
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.config.heartbeat = Some(every);
        self
    }

    /// Sets the status (and note) the TTL checks are reported with until
    /// [`RegistrationGuard::set_status`] changes it (default: passing).
    #[must_use]
    pub fn initial_status(mut self, status: CheckStatus, note: Option<&str>) -> Self {
        self.config.initial_status = status;
        self.config.initial_note = note.map(str::to_owned);
        self
    }

    /// Sets the first wait before retrying a failed heartbeat or re-registration; it
    /// doubles up to the heartbeat period (default 250 ms).
    #[must_use]
    pub fn retry_base(mut self, base: Duration) -> Self {
        self.config.retry_base = base;
        self
    }

    /// For a registration without TTL checks, how often to check that the agent still
    /// has it (`GET /v1/agent/services`) and register it again if not; `None` never
    /// checks (default 30 s).
    #[must_use]
    pub fn verify_interval(mut self, every: Option<Duration>) -> Self {
        self.config.verify_interval = every;
        self
    }

    /// Validates the configuration.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `heartbeat`, `retry_base` or `verify_interval` when
    /// zero.
    pub fn build(self) -> Result<GuardConfig, ConfigError> {
        let c = self.config;
        let zero = |name| Err(ConfigError::invalid(name, "must be greater than zero"));
        if c.heartbeat.is_some_and(|d| d.is_zero()) {
            return zero("heartbeat");
        }
        if c.retry_base.is_zero() {
            return zero("retry_base");
        }
        if c.verify_interval.is_some_and(|d| d.is_zero()) {
            return zero("verify_interval");
        }
        Ok(c)
    }
}

struct Shared {
    client: ConsulClient,
    registration: ServiceRegistration,
    status: watch::Sender<(CheckStatus, Option<String>)>,
    heartbeats: AtomicU64,
    registrations: AtomicU64,
    /// The guard is stopping: the task registers nothing again.
    stopping: AtomicBool,
    /// The task is registering again: a stopping guard lets it finish.
    registering: AtomicBool,
}

impl Shared {
    async fn register(&self) -> Result<(), ConsulError> {
        self.client.register(&self.registration).await?;
        self.registrations.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Reports every TTL check with the current status.
    async fn beat(&self) -> Result<(), ConsulError> {
        let (status, note) = self.status.borrow().clone();
        for (id, _) in self.registration.ttl_checks() {
            self.client
                .check_update(id, status, note.as_deref().unwrap_or_default())
                .await?;
        }
        self.heartbeats.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Registers again (the agent lost the registration), unless the guard is stopping
    /// (`None`). Marked in flight meanwhile: a stopping guard lets it finish rather than
    /// abort it mid-request, which could let it reach the agent after the deregistration.
    async fn register_again(&self) -> Option<Result<(), ConsulError>> {
        struct InFlight<'a>(&'a AtomicBool);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.store(false, SeqCst);
            }
        }
        self.registering.store(true, SeqCst);
        let _in_flight = InFlight(&self.registering);
        // After the mark (both sequentially consistent): a guard stopping now either sees
        // the mark and waits, or has set `stopping` before this reads it.
        if self.stopping.load(SeqCst) {
            return None;
        }
        Some(self.register().await)
    }

    /// Whether the agent still has the service.
    async fn still_registered(&self) -> Result<bool, ConsulError> {
        let services = self.client.agent_services().await?;
        Ok(services.iter().any(|s| s.id == self.registration.id()))
    }
}

/// A service registered with the local agent for as long as the guard lives.
///
/// * Registers on creation (with `replace-existing-checks`, so restarts are idempotent).
/// * Keeps TTL checks alive: reports them every heartbeat (a third of the shortest TTL by
///   default) with the status set by [`set_status`](Self::set_status) (or a
///   [`StatusHandle`]), at once when it changes.
/// * Registers again when the agent lost the registration: a heartbeat answered "unknown
///   check" (an agent restarted without its state), or, for registrations without TTL
///   checks, a periodic look at the agent's services.
/// * [`shutdown`](Self::shutdown) drains gracefully: deregister first, so that clients stop
///   picking the instance, then keep serving for a grace period while they notice.
/// * Dropped without `shutdown`, it deregisters from a spawned task (best effort: only
///   when a tokio runtime is still running).
///
/// ```no_run
/// use std::time::Duration;
/// use seawall::consul::{Check, CheckStatus, ConsulClient, RegistrationGuard, ServiceRegistration};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = ConsulClient::from_env()?;
/// let registration = ServiceRegistration::builder("users")
///     .id("users-1")
///     .port(8081)
///     .check(Check::ttl(Duration::from_secs(15)).deregister_critical_after(Duration::from_secs(600)))
///     .build()?;
/// let guard = RegistrationGuard::register(client, registration).await?;
/// // ... serve; when a dependency is down:
/// guard.set_status(CheckStatus::Warning, Some("database slow"));
/// // On SIGTERM:
/// guard.shutdown(Duration::from_secs(5)).await?;
/// # Ok(())
/// # }
/// ```
#[must_use = "dropping the guard deregisters the service"]
pub struct RegistrationGuard {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
    /// Tells the task to stop once the report it may be making is done.
    stop: watch::Sender<bool>,
    done: bool,
}

impl RegistrationGuard {
    /// Registers `registration` with the default [`GuardConfig`] and keeps it alive.
    ///
    /// # Errors
    ///
    /// The registration's [`ConsulError`], or the first heartbeat's; see
    /// [`register_with`](Self::register_with).
    pub async fn register(
        client: ConsulClient,
        registration: ServiceRegistration,
    ) -> Result<Self, ConsulError> {
        Self::register_with(client, registration, GuardConfig::default()).await
    }

    /// Registers `registration` and keeps it alive as `config` says. The TTL checks are
    /// reported once before this returns, so a registration that starts critical is
    /// passing (or what `config` says) when it does.
    ///
    /// Cancel-safe: dropped before it returns (a timeout around it), even while the
    /// registration request is in flight, it deregisters the service in the background
    /// (best effort: only while a tokio runtime is running).
    ///
    /// # Errors
    ///
    /// A [`Config`](super::ErrorKind::Config) error naming `heartbeat` when `config`'s
    /// heartbeat is not shorter than the shortest TTL check (nothing is sent); the
    /// registration's [`ConsulError`], or the first heartbeat's; nothing is kept alive
    /// then. When the heartbeat fails, the service is deregistered before this
    /// returns; when the registration fails without the agent's refusal (a `4xx`), in the
    /// background, in case the agent acted on it all the same (an ID it does not know is
    /// no error).
    pub async fn register_with(
        client: ConsulClient,
        registration: ServiceRegistration,
        config: GuardConfig,
    ) -> Result<Self, ConsulError> {
        // A heartbeat no shorter than a TTL lets that check lapse to critical between
        // reports, over and over: refused before anything is sent.
        if let (Some(every), Some(shortest)) = (
            config.heartbeat,
            registration.ttl_checks().map(|(_, ttl)| ttl).min(),
        ) {
            if every >= shortest {
                return Err(ConfigError::invalid(
                    "heartbeat",
                    format!(
                        "{every:?} is not shorter than the shortest TTL check's {shortest:?}: \
                         the check would lapse between reports (the default is a third of it)"
                    ),
                )
                .into());
            }
        }
        let (status, _) = watch::channel((config.initial_status, config.initial_note.clone()));
        let shared = Arc::new(Shared {
            client,
            registration,
            status,
            heartbeats: AtomicU64::new(0),
            registrations: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            registering: AtomicBool::new(false),
        });
        // Until this returns a guard, dropping the future (a timeout around `register`)
        // must not leave the service registered with nobody to remove it. Armed before
        // the request is sent: the agent may act on it while its answer is still on the
        // way, and deregistering an ID it never registered is no error.
        let mut undo = DeregisterOnDrop(Some(shared.clone()));
        // A failed registration may still have reached the agent (a timeout, a reset
        // connection): `undo` deregisters it in the background as it drops. Not one the
        // agent refused (`4xx`: a bad definition, an ACL denial): it registered nothing,
        // and an earlier registration under the same ID stays.
        if let Err(e) = shared.register().await {
            if e.status_code()
                .is_some_and(|code| (400..500).contains(&code))
            {
                undo.0 = None;
            }
            return Err(e);
        }
        let heartbeat = config.heartbeat_for(&shared.registration);
        // Watched from before the first report: a status set as soon as this returns (the
        // heartbeat task has not run yet) is a change the task reports at once.
        let mut status = shared.status.subscribe();
        status.borrow_and_update();
        if heartbeat.is_some() {
            if let Err(e) = shared.beat().await {
                undo.0 = None;
                let _ = shared.client.deregister(shared.registration.id()).await;
                return Err(e);
            }
        }
        undo.0 = None;
        let (stop, stopping) = watch::channel(false);
        let task = match (heartbeat, config.verify_interval) {
            (Some(period), _) => Some(tokio::spawn(heartbeat_loop(
                shared.clone(),
                period,
                config.retry_base,
                status,
                stopping,
            ))),
            (None, Some(period)) => Some(tokio::spawn(verify_loop(
                shared.clone(),
                period,
                config.retry_base,
                stopping,
            ))),
            (None, None) => None,
        };
        Ok(Self {
            shared,
            task,
            stop,
            done: false,
        })
    }

    /// The registration.
    pub fn registration(&self) -> &ServiceRegistration {
        &self.shared.registration
    }

    /// The service ID.
    pub fn service_id(&self) -> &str {
        self.shared.registration.id()
    }

    /// Sets the status the TTL checks are reported with, with `note` as their output;
    /// reported at once. Does nothing for a registration without TTL checks.
    pub fn set_status(&self, status: CheckStatus, note: Option<&str>) {
        set_status(&self.shared, status, note);
    }

    /// The status the TTL checks are reported with.
    pub fn status(&self) -> CheckStatus {
        self.shared.status.borrow().0
    }

    /// A handle that sets the status from elsewhere (a health monitor, a breaker's
    /// listener…).
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle {
            shared: self.shared.clone(),
        }
    }

    /// How many heartbeats succeeded.
    pub fn heartbeats(&self) -> u64 {
        self.shared.heartbeats.load(Relaxed)
    }

    /// How many times the service was registered (1, plus one per re-registration).
    pub fn registrations(&self) -> u64 {
        self.shared.registrations.load(Relaxed)
    }

    /// Drains: stops the heartbeat, deregisters at once (clients stop picking this
    /// instance as their watches update), then waits `grace` while the requests already
    /// routed here are served. A registration the heartbeat is sending again (the agent
    /// having lost it) is let finish first, a request's time limit at most, so that it
    /// cannot reach the agent after the deregistration.
    ///
    /// # Errors
    ///
    /// The deregistration's [`ConsulError`] (returned after the grace period all the
    /// same).
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), ConsulError> {
        self.stop_task().await;
        let result = self.shared.client.deregister(self.service_id()).await;
        // Only now: if this future is dropped before the deregistration completes (a
        // timeout around `shutdown`), `Drop` still deregisters.
        self.done = result.is_ok();
        #[cfg(feature = "tracing")]
        tracing::info!(
            service_id = self.service_id(),
            ?grace,
            deregistered = result.is_ok(),
            "consul registration draining"
        );
        tokio::time::sleep(grace).await;
        result
    }

    /// Deregisters now, without a grace period.
    ///
    /// # Errors
    ///
    /// The deregistration's [`ConsulError`].
    pub async fn deregister(self) -> Result<(), ConsulError> {
        self.shutdown(Duration::ZERO).await
    }

    async fn stop_task(&mut self) {
        let _ = self.stop.send(true);
        // Left in place until it has ended: if this future is dropped while a
        // re-registration is let finish (a timeout around `shutdown`), `Drop` finds the
        // task and waits for it too before deregistering, rather than deregistering at
        // once with the registration still on its way.
        if let Some(task) = self.task.as_mut() {
            finish(task, &self.shared).await;
        }
        self.task = None;
    }
}

/// Stops the task (told to stop through its channel too). A registration it is sending
/// again (the agent had lost it) is let finish, a request's time limit at most: aborted
/// mid-request, it could reach the agent after the deregistration that follows, and
/// register the service with no process behind it and nobody left to deregister it.
/// Anything else it is doing is aborted at once.
async fn finish(task: &mut JoinHandle<()>, shared: &Shared) {
    shared.stopping.store(true, SeqCst);
    if shared.registering.load(SeqCst) {
        let limit = shared.client.config().request_timeout();
        if tokio::time::timeout(limit, &mut *task).await.is_ok() {
            return;
        }
    }
    task.abort();
    let _ = task.await;
}

/// Deregisters in the background when dropped while armed.
struct DeregisterOnDrop(Option<Arc<Shared>>);

impl Drop for DeregisterOnDrop {
    fn drop(&mut self) {
        if let (Some(shared), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = shared.client.deregister(shared.registration.id()).await;
            });
        }
    }
}

impl Drop for RegistrationGuard {
    fn drop(&mut self) {
        self.shared.stopping.store(true, SeqCst);
        let _ = self.stop.send(true);
        let task = self.task.take();
        let runtime = tokio::runtime::Handle::try_current();
        if self.done || runtime.is_err() {
            if let Some(task) = task {
                task.abort();
            }
            return;
        }
        if let Ok(runtime) = runtime {
            let shared = self.shared.clone();
            runtime.spawn(async move {
                // As `shutdown`: the report in flight first, then the deregistration.
                if let Some(mut task) = task {
                    finish(&mut task, &shared).await;
                }
                let _result = shared.client.deregister(shared.registration.id()).await;
                #[cfg(feature = "tracing")]
                if let Err(error) = _result {
                    tracing::warn!(
                        service_id = shared.registration.id(),
                        %error,
                        "consul deregistration on drop failed"
                    );
                }
            });
        }
    }
}

impl fmt::Debug for RegistrationGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistrationGuard")
            .field("service_id", &self.service_id())
            .field("status", &self.status())
            .field("heartbeats", &self.heartbeats())
            .field("registrations", &self.registrations())
            .finish()
    }
}

/// Sets the status a [`RegistrationGuard`] reports its TTL checks with. Clones share the
/// guard; setting the status after the guard is gone does nothing.
#[derive(Clone)]
pub struct StatusHandle {
    shared: Arc<Shared>,
}

impl StatusHandle {
    /// Sets the status, with `note` as the checks' output; reported at once.
    pub fn set_status(&self, status: CheckStatus, note: Option<&str>) {
        set_status(&self.shared, status, note);
    }

    /// The status the TTL checks are reported with.
    pub fn status(&self) -> CheckStatus {
        self.shared.status.borrow().0
    }
}

impl fmt::Debug for StatusHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusHandle")
            .field("service_id", &self.shared.registration.id())
            .field("status", &self.status())
            .finish()
    }
}

/// Sets the status the TTL checks are reported with; the heartbeat reports it at once
/// only when it changed: the agent writes every check update to disk, and a caller
/// setting the same status on every request (a readiness probe's result) would otherwise
/// send one update each, and while the agent is down, skip the heartbeat's back-off.
fn set_status(shared: &Shared, status: CheckStatus, note: Option<&str>) {
    shared.status.send_if_modified(|current| {
        if current.0 == status && current.1.as_deref() == note {
            return false;
        }
        *current = (status, note.map(str::to_owned));
        true
    });
}

async fn heartbeat_loop(
    shared: Arc<Shared>,
    period: Duration,
    retry_base: Duration,
    mut status: watch::Receiver<(CheckStatus, Option<String>)>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut rng = seed(shared.registration.id());
    let mut failures = 0u32;
    let mut next = super::later(period);
    // The shortest TTL, and when the agent last took a report (the first, just made).
    let ttl = shared
        .registration
        .ttl_checks()
        .map(|(_, ttl)| ttl)
        .min()
        .unwrap_or(period);
    let mut reported = tokio::time::Instant::now();
    loop {
        tokio::select! {
            // First: once told to stop, no report is started.
            biased;
            _ = stopping.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep_until(next) => {}
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                status.borrow_and_update();
            }
        }
        // Each report bounded: an agent that holds one (a disk stall, a hung connection)
        // must not hold back the next until the check's TTL lapses (the client's own
        // limit, 10 s by default, is unrelated to the TTL). Half of what is left of the
        // TTL since the last report taken, and at least a period: a slow agent answering
        // every report in more than a period still takes them.
        let report = async {
            match shared.beat().await {
                Err(e) if e.is_unknown_check() => {
                    // The agent lost the registration (restarted without its state, or the
                    // check was removed): register again, then report at once.
                    #[cfg(feature = "tracing")]
                    tracing::warn!(
                        service_id = shared.registration.id(),
                        "consul agent lost the registration; registering again"
                    );
                    match shared.register_again().await {
                        Some(Ok(())) => shared.beat().await,
                        Some(Err(e)) => Err(e),
                        // Stopping: the loop ends at its next turn.
                        None => Ok(()),
                    }
                }
                other => other,
            }
        };
        let left = ttl.saturating_sub(reported.elapsed());
        let bound = period.max(left / 2);
        let result = match tokio::time::timeout(bound, report).await {
            Ok(result) => result,
            Err(_) => Err(ConsulError::timeout(bound)),
        };
        match result {
            Ok(()) => {
                failures = 0;
                reported = tokio::time::Instant::now();
                next = super::later(period);
            }
            Err(_error) => {
                failures = failures.saturating_add(1);
                let delay = backoff(failures, retry_base, period.max(retry_base), &mut rng);
                #[cfg(feature = "tracing")]
                tracing::warn!(
                    service_id = shared.registration.id(),
                    error = %_error,
                    failures,
                    retry_in = ?delay,
                    "consul heartbeat failed"
                );
                next = super::later(delay);
            }
        }
    }
}

async fn verify_loop(
    shared: Arc<Shared>,
    period: Duration,
    retry_base: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    let mut rng = seed(shared.registration.id());
    let mut failures = 0u32;
    let mut delay = period;
    loop {
        tokio::select! {
            biased;
            _ = stopping.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(delay) => {}
        }
        let result = match shared.still_registered().await {
            Ok(true) => Ok(()),
            Ok(false) => {
                #[cfg(feature = "tracing")]
                tracing::warn!(
                    service_id = shared.registration.id(),
                    "consul agent lost the registration; registering again"
                );
                shared.register_again().await.unwrap_or(Ok(()))
            }
            Err(e) => Err(e),
        };
        if result.is_ok() {
            failures = 0;
            delay = period;
        } else {
            failures = failures.saturating_add(1);
            delay = backoff(failures, retry_base, period.max(retry_base), &mut rng);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::Check;

    #[test]
    fn heartbeat_defaults_to_a_third_of_the_shortest_ttl() {
        let r = ServiceRegistration::builder("s")
            .check(Check::ttl(Duration::from_secs(30)))
            .check(Check::ttl(Duration::from_secs(9)))
            .check(Check::tcp("h:1", Duration::from_secs(1)))
            .build()
            .unwrap();
        let c = GuardConfig::default();
        assert_eq!(c.heartbeat_for(&r), Some(Duration::from_secs(3)));
        let c = GuardConfig::builder()
            .heartbeat(Duration::from_secs(1))
            .build()
            .unwrap();
        assert_eq!(c.heartbeat_for(&r), Some(Duration::from_secs(1)));
        let no_ttl = ServiceRegistration::builder("s").build().unwrap();
        assert_eq!(c.heartbeat_for(&no_ttl), None);
    }

    #[test]
    fn config_is_validated() {
        let e = GuardConfig::builder()
            .heartbeat(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "heartbeat");
        let e = GuardConfig::builder()
            .verify_interval(Some(Duration::ZERO))
            .build()
            .unwrap_err();
        assert_eq!(e.field(), "verify_interval");
    }
}
