//! What every backend of the server shares about the platform, in shared memory created
//! lazily (no `shared_preload_libraries`, no restart): the recognition token, refreshed
//! ahead by one backend while the others keep using the current one, and the org-wide
//! pause a `429` asks for (contract §7), set by SQL calls and by the worker alike.
//!
//! Read and written from the calls' own threads too: the segment holds atomics and a
//! token slot behind a spin lock, nothing of PostgreSQL's (no palloc, no LWLock there).

use std::cell::UnsafeCell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Index of `AddinShmemInitLock` in `MainLWLockArray` (storage/lwlocknames.h). PostgreSQL
/// exports it as a C macro only; the index is checked by name before first use, so another
/// major version fails loudly instead of taking the wrong lock.
const ADDIN_SHMEM_INIT_LOCK: usize = 21;

/// Finds or creates the struct `name` in shared memory; `init` fills a new one.
pub fn shmem_struct<T>(name: &'static CStr, init: impl FnOnce() -> T) -> &'static T {
    // SAFETY: GetLWLockIdentifier returns a static C string for a valid id (or "???").
    let lock_name = unsafe {
        CStr::from_ptr(pg_sys::GetLWLockIdentifier(
            pg_sys::PG_WAIT_LWLOCK,
            ADDIN_SHMEM_INIT_LOCK as u16,
        ))
    };
    if lock_name != c"AddinShmemInit" {
        error!(
            "hmr: this PostgreSQL ({}) numbers its built-in locks differently (lock {} is {:?}, not AddinShmemInit); \
             this build of hmr is for PostgreSQL 15",
            pg_sys::PG_VERSION_NUM,
            ADDIN_SHMEM_INIT_LOCK,
            lock_name
        );
    }
    // SAFETY: the index was checked by name above; the add-in init lock serialises creation;
    // ShmemInitStruct returns the same address in every backend for the same name and size
    // (or raises ERROR when shared memory is exhausted); T is written once, under the lock,
    // before anyone can see it.
    unsafe {
        let lock = &raw mut (*pg_sys::MainLWLockArray.add(ADDIN_SHMEM_INIT_LOCK)).lock;
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let ptr = pg_sys::ShmemInitStruct(name.as_ptr(), size_of::<T>(), &mut found).cast::<T>();
        if !found {
            ptr.write(init());
        }
        pg_sys::LWLockRelease(lock);
        &*ptr
    }
}

const TOKEN_BYTES: usize = 4096;

/// The recognition token slot. Guarded by `lock` (a spin lock: held for a copy only).
struct TokenSlot {
    len: usize,
    /// Wall-clock milliseconds: refresh from then on; unusable from `expires_ms`.
    refresh_ms: i64,
    expires_ms: i64,
    /// Which settings the token was obtained with (credentials changed: fetch anew).
    settings: u64,
    bytes: [u8; TOKEN_BYTES],
}

#[repr(C)]
pub struct SharedPlatform {
    lock: AtomicU32,
    slot: UnsafeCell<TokenSlot>,
    /// Wall-clock ms when the backend now fetching a token started (0: nobody is).
    fetching_since_ms: AtomicI64,
    /// Wall-clock ms until which the platform asked the org to wait (429 Retry-After).
    paused_until_ms: AtomicI64,
    /// Tokens this server obtained for SQL calls (for the benchmark and operators).
    tokens_fetched: AtomicU64,
}

// SAFETY: `slot` is only touched while `lock` is held (see `with_slot`); everything else is
// atomic.
unsafe impl Sync for SharedPlatform {}

static SHARED: AtomicPtr<SharedPlatform> = AtomicPtr::new(std::ptr::null_mut());

/// The shared state; call on the backend's own thread first (it may create the segment),
/// then the reference may go to the call's thread.
pub fn platform() -> &'static SharedPlatform {
    let here = SHARED.load(Ordering::Acquire);
    if !here.is_null() {
        // SAFETY: set below from shmem_struct's 'static reference.
        return unsafe { &*here };
    }
    let state = shmem_struct(c"hmr platform", || SharedPlatform {
        lock: AtomicU32::new(0),
        slot: UnsafeCell::new(TokenSlot {
            len: 0,
            refresh_ms: 0,
            expires_ms: 0,
            settings: 0,
            bytes: [0; TOKEN_BYTES],
        }),
        fetching_since_ms: AtomicI64::new(0),
        paused_until_ms: AtomicI64::new(0),
        tokens_fetched: AtomicU64::new(0),
    });
    SHARED.store(std::ptr::from_ref(state).cast_mut(), Ordering::Release);
    state
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How long a fetch by another backend is waited for before this one fetches too.
const FETCH_PATIENCE_MS: i64 = 5_000;

/// Why no token could be had.
pub enum TokenWait {
    /// Fetch one now (this caller won the right to).
    Fetch,
    /// Another backend is fetching: try again shortly.
    Wait,
}

impl SharedPlatform {
    fn with_slot<R>(&self, f: impl FnOnce(&mut TokenSlot) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the spin lock above gives this thread the only access until released.
        let r = f(unsafe { &mut *self.slot.get() });
        self.lock.store(0, Ordering::Release);
        r
    }

    /// The token for `settings`, if one is held and usable; or whether to fetch one.
    pub fn token(&self, settings: u64) -> Result<String, TokenWait> {
        let now = now_ms();
        let (held, fresh) = self.with_slot(|s| {
            if s.len == 0 || s.settings != settings || now >= s.expires_ms {
                (None, false)
            } else {
                (
                    Some(String::from_utf8_lossy(&s.bytes[..s.len]).into_owned()),
                    now < s.refresh_ms,
                )
            }
        });
        if fresh {
            return held.ok_or(TokenWait::Fetch);
        }
        // Due for refresh (or none): one backend fetches; the others use what is held.
        let since = self.fetching_since_ms.load(Ordering::Acquire);
        let won = (since == 0 || now - since > FETCH_PATIENCE_MS)
            && self
                .fetching_since_ms
                .compare_exchange(since, now.max(1), Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        match (held, won) {
            (_, true) => Err(TokenWait::Fetch),
            (Some(t), false) => Ok(t),
            (None, false) => Err(TokenWait::Wait),
        }
    }

    /// Keeps a token obtained with `settings`, valid for `lifetime` (refreshed at 80 %).
    pub fn store_token(&self, settings: u64, token: &str, lifetime: Duration) {
        let now = now_ms();
        let life = lifetime.as_millis() as i64;
        if token.len() <= TOKEN_BYTES {
            self.with_slot(|s| {
                s.bytes[..token.len()].copy_from_slice(token.as_bytes());
                s.len = token.len();
                s.settings = settings;
                s.refresh_ms = now + life * 8 / 10;
                s.expires_ms = now + life;
            });
        }
        self.tokens_fetched.fetch_add(1, Ordering::Relaxed);
        self.fetching_since_ms.store(0, Ordering::Release);
    }

    /// The fetch failed: let another caller try.
    pub fn fetch_failed(&self) {
        self.fetching_since_ms.store(0, Ordering::Release);
    }

    /// A token the platform refused (401): forget it unless it was replaced already.
    pub fn forget_token(&self, refused: &str) {
        self.with_slot(|s| {
            if &s.bytes[..s.len] == refused.as_bytes() {
                s.len = 0;
            }
        });
    }

    /// The platform asked the org to wait this long (429 Retry-After).
    pub fn pause(&self, after: Duration) {
        let until = now_ms() + after.as_millis() as i64;
        self.paused_until_ms.fetch_max(until, Ordering::AcqRel);
    }

    /// How long the org still has to wait, if it has to.
    pub fn paused_for(&self) -> Option<Duration> {
        let left = self.paused_until_ms.load(Ordering::Acquire) - now_ms();
        (left > 0).then(|| Duration::from_millis(left as u64))
    }

    pub fn tokens_fetched(&self) -> u64 {
        self.tokens_fetched.load(Ordering::Relaxed)
    }
}

/// Waits (on the call's thread) for another backend's token fetch, up to `deadline`.
pub fn wait_a_moment(deadline: Instant) -> bool {
    if Instant::now() + Duration::from_millis(2) >= deadline {
        return false;
    }
    std::thread::sleep(Duration::from_millis(2));
    true
}

/// The worker (or an operator) tells SQL calls that the platform asked the org to wait:
/// `seconds` from now. Returns how long SQL calls now wait, in seconds.
#[pg_extern]
fn note_rate_limit(seconds: f64) -> f64 {
    let shared = platform();
    if seconds.is_finite() && seconds > 0.0 {
        shared.pause(Duration::from_secs_f64(seconds.min(3600.0)));
    }
    shared.paused_for().map_or(0.0, |d| d.as_secs_f64())
}

/// Tokens obtained for SQL calls since the server started (all backends together).
#[pg_extern]
fn platform_tokens_fetched() -> i64 {
    platform().tokens_fetched() as i64
}
