//! The loaded models: loading (resolving names, fetching catalog models on demand),
//! unloading, lookup for requests, per-model health, and the event feed of WatchModels.
//!
//! Loads are serialized (one at a time, as a model load saturates the disk and the CPU
//! anyway); lookups never wait for a load. A failed load changes nothing that was loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::broadcast;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::Instrument;

use super::keep_alive::KeepAlive;
use super::status::ServerError;
use crate::engine::{Engine, EngineInfo, EngineOptions, SparsityMode};
use crate::store::{self, PathPolicy};

/// Events a slow WatchModels client may fall behind by before it misses some.
const EVENT_BACKLOG: usize = 64;

/// What a load asks for; `None` fields take the server's defaults.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadSpec {
    pub reference: String,
    pub ctx: Option<usize>,
    pub sparsity: Option<SparsityMode>,
    pub device: Option<String>,
    pub vram_budget: Option<u64>,
}

impl LoadSpec {
    pub fn named(reference: &str) -> Self {
        Self {
            reference: reference.to_owned(),
            ..Self::default()
        }
    }
}

/// A change in the set of loaded models.
#[derive(Clone, Debug)]
pub enum ModelEvent {
    Loading {
        model: String,
        progress: f32,
        stage: &'static str,
    },
    Loaded(Box<EngineInfo>),
    Unloaded(String),
    Failed {
        model: String,
        error: String,
    },
}

/// A loaded model as Status and ListModels report it.
#[derive(Clone, Debug)]
pub struct ModelSnapshot {
    pub info: EngineInfo,
    /// Mean fraction of feed-forward neurons computed, per layer, since the load.
    pub active_fraction: Vec<f32>,
    /// Share of the computed neurons that were hot (on the device).
    pub hot_hit_rate: f32,
}

pub struct ModelManager {
    models_dir: PathBuf,
    paths: PathPolicy,
    defaults: EngineOptions,
    /// The Python that fetches catalog models.
    python: String,
    /// Shared with the tasks that watch each engine's health.
    loaded: Arc<RwLock<BTreeMap<String, Arc<Engine>>>>,
    load_lock: tokio::sync::Mutex<()>,
    /// Taken at shutdown, which ends every WatchModels stream.
    events: std::sync::Mutex<Option<broadcast::Sender<ModelEvent>>>,
    health: HealthReporter,
    /// Every name given a health status, so shutdown can end their health watches.
    health_names: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Seconds each model's last successful load took.
    load_seconds: std::sync::Mutex<BTreeMap<String, f64>>,
    /// How long an idle model stays loaded unless a request says otherwise.
    keep_alive: KeepAlive,
    /// Per loaded model: when it was last used, and its keep-alive.
    idle: std::sync::Mutex<BTreeMap<String, (Instant, KeepAlive)>>,
    /// Host memory the loaded models may take together ([`Engine::memory_bytes`]); idle
    /// ones are unloaded, least recently used first, to make room for a load.
    memory_budget: Option<u64>,
    /// Names being loaded now.
    loading: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// Takes a name out of the loading set when its load ends, however it ends.
struct Loading<'a>(&'a ModelManager, String);

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        self.0.loading_set().remove(&self.1);
    }
}

/// The name a model is served under: the reference itself, or a path's file stem.
pub fn model_name(reference: &str) -> String {
    let is_path =
        reference.contains('/') || reference.contains('\\') || reference.ends_with(".gguf");
    if is_path {
        Path::new(reference).file_stem().map_or_else(
            || reference.to_owned(),
            |s| s.to_string_lossy().into_owned(),
        )
    } else {
        reference.to_owned()
    }
}

impl ModelManager {
    pub fn new(
        models_dir: PathBuf,
        allow_paths: bool,
        defaults: EngineOptions,
        python: String,
        health: HealthReporter,
    ) -> Self {
        Self {
            models_dir,
            paths: if allow_paths {
                PathPolicy::Allow
            } else {
                PathPolicy::Refuse
            },
            defaults,
            python,
            loaded: Arc::new(RwLock::new(BTreeMap::new())),
            load_lock: tokio::sync::Mutex::new(()),
            events: std::sync::Mutex::new(Some(broadcast::channel(EVENT_BACKLOG).0)),
            health,
            health_names: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            load_seconds: std::sync::Mutex::new(BTreeMap::new()),
            keep_alive: KeepAlive::default(),
            idle: std::sync::Mutex::new(BTreeMap::new()),
            memory_budget: None,
            loading: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    /// Limits the host memory the loaded models take together (`None`: no limit).
    pub fn with_memory_budget(mut self, budget: Option<u64>) -> Self {
        self.memory_budget = budget;
        self
    }

    pub fn memory_budget(&self) -> Option<u64> {
        self.memory_budget
    }

    fn loading_set(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<String>> {
        self.loading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `name` is being loaded now.
    pub fn is_loading(&self, name: &str) -> bool {
        self.loading_set().contains(name)
    }

    /// Whether any model is being loaded now.
    pub fn any_loading(&self) -> bool {
        !self.loading_set().is_empty()
    }

    /// The keep-alive of models that no request set one for.
    pub fn with_keep_alive(mut self, keep: KeepAlive) -> Self {
        self.keep_alive = keep;
        self
    }

    fn idle_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Instant, KeepAlive)>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks `reference`'s model as used now, setting its keep-alive when given.
    pub fn touch(&self, reference: &str, keep: Option<KeepAlive>) {
        let name = model_name(reference);
        let default = self.keep_alive;
        let mut idle = self.idle_map();
        let e = idle.entry(name).or_insert((Instant::now(), default));
        e.0 = Instant::now();
        if let Some(k) = keep {
            e.1 = k;
        }
    }

    /// Unloads the models idle past their keep-alive (a model with requests running or
    /// queued is not idle). Returns the names unloaded.
    pub async fn reap(&self) -> Vec<String> {
        let now = Instant::now();
        let due: Vec<String> = self
            .idle_map()
            .iter()
            .filter(|(_, (used, keep))| keep.expired(now.duration_since(*used)))
            .map(|(n, _)| n.clone())
            .collect();
        let mut gone = Vec::new();
        for name in due {
            let Some(engine) = self.get(&name) else {
                self.idle_map().remove(&name);
                continue;
            };
            let busy = match engine.info().await {
                Ok(i) => i.sched.active + i.sched.queued > 0,
                Err(_) => false,
            };
            drop(engine);
            if busy {
                self.touch(&name, None);
            } else if self.unload(&name).await.is_ok() {
                tracing::info!(model = %name, "unloaded: idle past its keep_alive");
                gone.push(name);
            }
        }
        gone
    }

    /// Seconds each model's last successful load took (for the metrics).
    pub fn load_seconds(&self) -> Vec<(String, f64)> {
        self.load_seconds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    async fn set_health(&self, name: &str, status: ServingStatus) {
        self.health_names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned());
        self.health.set_service_status(name, status).await;
    }

    /// The Python that fetches catalog models.
    pub fn python(&self) -> &str {
        &self.python
    }

    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    pub fn defaults(&self) -> &EngineOptions {
        &self.defaults
    }

    fn events(&self) -> std::sync::MutexGuard<'_, Option<broadcast::Sender<ModelEvent>>> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The event feed; after shutdown has begun, a feed that ends at once.
    pub fn subscribe(&self) -> broadcast::Receiver<ModelEvent> {
        match &*self.events() {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    fn emit(&self, event: ModelEvent) {
        if let Some(tx) = &*self.events() {
            // No subscriber is fine.
            let _ = tx.send(event);
        }
    }

    fn loaded_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Engine>>> {
        // A poisoned lock only means a panic elsewhere while holding it; the map itself is
        // always consistent (single inserts and removes).
        self.loaded
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn loaded_map_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Engine>>> {
        self.loaded
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Engine>> {
        self.loaded_map().get(name).cloned()
    }

    pub fn loaded(&self) -> Vec<Arc<Engine>> {
        self.loaded_map().values().cloned().collect()
    }

    /// The engine serving `reference`, loading it with the defaults if it is not loaded
    /// (as Ollama does for a generate request).
    pub async fn get_or_load(&self, reference: &str) -> Result<Arc<Engine>, ServerError> {
        if reference.is_empty() {
            return Err(ServerError::InvalidArgument("model is required".into()));
        }
        let name = model_name(reference);
        if name != reference && self.paths == PathPolicy::Refuse {
            return Err(ServerError::PathRefused(reference.to_owned()));
        }
        if let Some(e) = self.get(&name) {
            return Ok(e);
        }
        self.load(LoadSpec::named(reference)).await
    }

    fn options_for(&self, spec: &LoadSpec) -> EngineOptions {
        let mut opts = self.defaults.clone();
        if let Some(ctx) = spec.ctx {
            opts.n_ctx = ctx;
            opts.max_prompt_tokens = self.defaults.max_prompt_tokens.min(ctx.saturating_sub(1));
        }
        if let Some(s) = spec.sparsity {
            opts.sparsity = s;
        }
        if let Some(d) = &spec.device {
            opts.device = d.clone();
        }
        if let Some(b) = spec.vram_budget {
            opts.vram_budget = b;
        }
        opts
    }

    /// Checks that a loaded model satisfies a load request's explicit settings.
    fn check_same(
        name: &str,
        engine: &Engine,
        want: &EngineOptions,
        spec: &LoadSpec,
    ) -> Result<(), ServerError> {
        let have = engine.options();
        let differs = |setting: &'static str, current: String| ServerError::LoadedDifferently {
            name: name.to_owned(),
            setting,
            current,
        };
        if spec.ctx.is_some() && want.n_ctx != have.n_ctx {
            return Err(differs("context size", have.n_ctx.to_string()));
        }
        if spec.sparsity.is_some() && want.sparsity != have.sparsity {
            return Err(differs("sparsity", have.sparsity.name().to_owned()));
        }
        if spec.device.is_some() && want.device != have.device {
            return Err(differs("device", have.device.clone()));
        }
        if spec.vram_budget.is_some() && want.vram_budget != have.vram_budget {
            return Err(differs("device budget", have.vram_budget.to_string()));
        }
        Ok(())
    }

    /// Loads a model (returning the loaded one if it is already there with compatible
    /// settings). Resolution, fetching and loading run on blocking threads.
    pub async fn load(&self, spec: LoadSpec) -> Result<Arc<Engine>, ServerError> {
        if spec.reference.trim().is_empty() {
            return Err(ServerError::InvalidArgument("model is required".into()));
        }
        let name = model_name(&spec.reference);
        let is_path = name != spec.reference;
        if is_path && self.paths == PathPolicy::Refuse {
            return Err(ServerError::PathRefused(spec.reference));
        }
        let opts = self.options_for(&spec);
        let _guard = self.load_lock.lock().await;
        if let Some(e) = self.get(&name) {
            Self::check_same(&name, &e, &opts, &spec)?;
            return Ok(e);
        }
        let span = tracing::info_span!("load_model", model = %name);
        self.load_new(name, spec.reference, opts)
            .instrument(span)
            .await
    }

    async fn load_new(
        &self,
        name: String,
        reference: String,
        opts: EngineOptions,
    ) -> Result<Arc<Engine>, ServerError> {
        tracing::info!(%reference, "loading");
        self.loading_set().insert(name.clone());
        let _loading = Loading(self, name.clone());
        let started = std::time::Instant::now();
        self.set_health(&name, ServingStatus::NotServing).await;
        self.emit(ModelEvent::Loading {
            model: name.clone(),
            progress: 0.0,
            stage: "resolving",
        });
        let result = self.load_blocking(&name, &reference, opts).await;
        match result {
            Ok(engine) => {
                let engine = Arc::new(engine);
                self.load_seconds
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(name.clone(), started.elapsed().as_secs_f64());
                self.loaded_map_mut().insert(name.clone(), engine.clone());
                self.touch(&name, None);
                self.set_health(&name, ServingStatus::Serving).await;
                self.watch_failure(&name, &engine);
                if let Ok(info) = engine.info().await {
                    self.emit(ModelEvent::Loaded(Box::new(info)));
                }
                tracing::info!("loaded");
                Ok(engine)
            }
            Err(e) => {
                tracing::warn!(error = %e, "load failed");
                self.health.clone().clear_service_status(&name).await;
                self.emit(ModelEvent::Failed {
                    model: name,
                    error: e.to_string(),
                });
                Err(e)
            }
        }
    }

    async fn load_blocking(
        &self,
        name: &str,
        reference: &str,
        opts: EngineOptions,
    ) -> Result<Engine, ServerError> {
        let (dir, paths, r) = (self.models_dir.clone(), self.paths, reference.to_owned());
        let python = self.python.clone();
        let path = tokio::task::spawn_blocking(move || store::resolve(&r, &dir, paths, &python))
            .await
            .map_err(|e| ServerError::Internal(format!("resolving the model: {e}")))??;
        if let Some(budget) = self.memory_budget {
            let (p, z) = (path.clone(), (opts.n_ctx, opts.max_sequences, opts.kv_type));
            let need = tokio::task::spawn_blocking(move || {
                crate::model::memory_estimate(&p, z.0, z.1, z.2)
            })
            .await
            .map_err(|e| ServerError::Internal(format!("reading the model: {e}")))?
            .map_err(|e| ServerError::Engine(e.into()))?;
            self.make_room(name, need, budget).await?;
        }
        self.emit(ModelEvent::Loading {
            model: name.to_owned(),
            progress: 0.5,
            stage: "loading",
        });
        let n = name.to_owned();
        let engine = tokio::task::spawn_blocking(move || Engine::load(&n, &path, opts))
            .await
            .map_err(|e| ServerError::Internal(format!("loading the model: {e}")))??;
        Ok(engine)
    }

    /// Unloads idle models, least recently used first, until `need` more bytes fit in
    /// `budget` (the caller holds the load lock).
    async fn make_room(&self, name: &str, need: u64, budget: u64) -> Result<(), ServerError> {
        if need > budget {
            return Err(ServerError::LargerThanBudget {
                model: name.to_owned(),
                need,
                budget,
            });
        }
        loop {
            let loaded = self.loaded();
            let held: u64 = loaded.iter().map(|e| e.memory_bytes()).sum();
            if held.saturating_add(need) <= budget {
                return Ok(());
            }
            // Oldest use first; a model the idle map does not know counts as oldest.
            let mut by_use: Vec<(Option<Instant>, Arc<Engine>)> = {
                let idle = self.idle_map();
                loaded
                    .into_iter()
                    .map(|e| (idle.get(e.name()).map(|u| u.0), e))
                    .collect()
            };
            by_use.sort_by_key(|(used, _)| *used);
            let mut busy = Vec::new();
            let mut victim = None;
            for (_, engine) in by_use {
                let in_use = match engine.info().await {
                    Ok(i) => i.sched.active + i.sched.queued > 0,
                    Err(_) => false,
                };
                if in_use {
                    busy.push(engine.name().to_owned());
                } else {
                    victim = Some(engine.name().to_owned());
                    break;
                }
            }
            let Some(victim) = victim else {
                return Err(ServerError::OverMemoryBudget {
                    model: name.to_owned(),
                    need,
                    budget,
                    held,
                    busy,
                });
            };
            tracing::info!(model = %victim, for_model = %name, "unloaded: least recently used, to make room");
            self.unload_locked(&victim).await?;
        }
    }

    /// When `engine` fails (an actor panicked, its device failed), its name reports
    /// NOT_SERVING — if the name still belongs to it.
    fn watch_failure(&self, name: &str, engine: &Arc<Engine>) {
        let mut failed = engine.health().watch();
        let (loaded, weak) = (self.loaded.clone(), Arc::downgrade(engine));
        let (health, name) = (self.health.clone(), name.to_owned());
        tokio::spawn(async move {
            // Ends when the engine is dropped (its health with it).
            while failed.changed().await.is_ok() {
                let reason = failed.borrow_and_update().clone();
                let Some(reason) = reason else { continue };
                let current = loaded
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&name)
                    .cloned();
                if let (Some(now), Some(this)) = (current, weak.upgrade())
                    && Arc::ptr_eq(&now, &this)
                {
                    tracing::warn!(model = %name, %reason, "model failed, not serving");
                    health
                        .set_service_status(&name, ServingStatus::NotServing)
                        .await;
                }
                return;
            }
        });
    }

    /// Unloads a model: new requests no longer reach it; streams already running finish,
    /// and its memory is freed when the last one ends.
    pub async fn unload(&self, reference: &str) -> Result<(), ServerError> {
        let _guard = self.load_lock.lock().await;
        self.unload_locked(reference).await
    }

    /// [`Self::unload`] by a caller holding the load lock.
    async fn unload_locked(&self, reference: &str) -> Result<(), ServerError> {
        let name = model_name(reference);
        let removed = self.loaded_map_mut().remove(&name);
        self.idle_map().remove(&name);
        if removed.is_none() {
            return Err(ServerError::NotLoaded(name));
        }
        self.set_health(&name, ServingStatus::NotServing).await;
        tracing::info!(model = %name, "unloaded");
        self.emit(ModelEvent::Unloaded(name));
        Ok(())
    }

    /// Shutdown has begun: every model is marked not serving, then the event feeds and
    /// the models' health watches end (so they do not hold the drain open).
    pub async fn drain(&self) {
        self.events().take();
        let names: Vec<String> = std::mem::take(
            &mut *self
                .health_names
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_iter()
        .collect();
        let mut health = self.health.clone();
        for name in &names {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        for name in &names {
            health.clear_service_status(name).await;
        }
    }

    /// Drops every engine (their actors stop after their current step).
    pub fn clear(&self) {
        self.loaded_map_mut().clear();
    }

    pub async fn snapshots(&self) -> Vec<ModelSnapshot> {
        let mut out = Vec::new();
        for engine in self.loaded() {
            if let Some(s) = snapshot(&engine).await {
                out.push(s);
            }
        }
        out
    }
}

/// A loaded model's state, `None` when its engine has stopped.
pub async fn snapshot(engine: &Engine) -> Option<ModelSnapshot> {
    let info = engine.info().await.ok()?;
    let activity = engine.activity().ok()?;
    Some(ModelSnapshot {
        info,
        active_fraction: activity.active_fraction,
        hot_hit_rate: activity.hot_hit_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(model_name("smollm2-135m"), "smollm2-135m");
        assert_eq!(model_name("/models/tiny.gguf"), "tiny");
        assert_eq!(model_name("tiny.gguf"), "tiny");
    }
}
