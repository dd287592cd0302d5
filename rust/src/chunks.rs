//! Where chunk bytes come from: [`ChunkBytes`], with a local directory ([`LocalDir`]: the chunk files,
//! streamed) and an object store ([`ObjectStoreChunks`]: S3 and S3-compatible servers through the
//! `object_store` crate, with the URL and options the store was opened with).
//!
//! A scan asks for its chunks in order, all at once ([`ChunkBytes::fetch`]); an object store then keeps
//! up to `ahead` GETs in flight on a small tokio runtime while the scoring threads take the objects that
//! have arrived, so a scan is bound by throughput, not by one request's latency. The bytes are the
//! chunks as stored (data + crc32c); `read.rs` checks their size and checksum.

use std::fs::File;
use std::io::{self, ErrorKind, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

use crate::read::ReadError;

/// One chunk being read front to back: a local file (streamed) or an object's bytes (fetched whole).
pub enum Chunk {
    File(File),
    Fetched { bytes: Bytes, at: usize },
}

impl Chunk {
    /// The chunk's size in bytes.
    pub fn len(&self) -> io::Result<u64> {
        match self {
            Chunk::File(f) => Ok(f.metadata()?.len()),
            Chunk::Fetched { bytes, .. } => Ok(bytes.len() as u64),
        }
    }

    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

impl Read for Chunk {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Chunk::File(f) => f.read(buf),
            Chunk::Fetched { bytes, at } => {
                let n = buf.len().min(bytes.len() - *at);
                buf[..n].copy_from_slice(&bytes[*at..*at + n]);
                *at += n;
                Ok(n)
            }
        }
    }
}

/// The iterator [`ChunkBytes::fetch`] returns: the chunks of the keys, in order.
pub type Chunks<'a> = Box<dyn Iterator<Item = Result<Chunk, ReadError>> + Send + 'a>;

/// A source of chunk bytes, keyed by the chunk's key relative to the store root
/// (`<array path>/c/<row chunk>/<column chunk>`).
pub trait ChunkBytes: Sync {
    /// The chunks at `keys`, in order, fetched up to `ahead` ahead of the consumer where that helps
    /// (an object store; a local file is opened when it is taken). An absent chunk is
    /// [`ReadError::Missing`] naming its key. Dropping the iterator stops the fetches.
    fn fetch<'a>(&'a self, keys: Vec<String>, ahead: usize) -> Chunks<'a>;
}

/// The chunk files under a local store's root.
pub struct LocalDir(pub PathBuf);

impl ChunkBytes for LocalDir {
    fn fetch<'a>(&'a self, keys: Vec<String>, _ahead: usize) -> Chunks<'a> {
        Box::new(keys.into_iter().map(move |key| match File::open(self.0.join(&key)) {
            Ok(f) => Ok(Chunk::File(f)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(ReadError::Missing { key }),
            Err(e) => Err(ReadError::Corrupt { key, why: format!("cannot open: {e}") }),
        }))
    }
}

/// The objects of a store on an object store (`s3://bucket/prefix`), read with the store's options.
pub struct ObjectStoreChunks {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    gets: Arc<AtomicU64>,
}

impl ObjectStoreChunks {
    /// A client of the S3 store at `url` (`s3://bucket/prefix`) configured as obstore configures the
    /// store's own: the `AWS_*` environment, then `options` (object_store's configuration keys, e.g.
    /// `endpoint`, `access_key_id`, `secret_access_key`, `region`, `allow_http`). Err with a one-line
    /// reason for a URL or a key it does not know (the caller then reads through zarr-python).
    pub fn new(url: &str, options: Vec<(String, String)>) -> Result<Self, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("store URL {url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "s3" | "s3a") {
            return Err(format!("store URL {url:?}: the Rust reader serves s3:// stores, not {}://", parsed.scheme()));
        }
        let mut builder = AmazonS3Builder::from_env().with_url(url);
        for (key, value) in options {
            let key: AmazonS3ConfigKey = key.parse().map_err(|_| format!("unknown S3 option {key:?}"))?;
            builder = builder.with_config(key, value);
        }
        let store = builder.build().map_err(|e| format!("store URL {url:?}: {e}"))?;
        Ok(Self::with_store(Arc::new(store), parsed.path()))
    }

    /// A client of the store under `prefix` of `store` (any object_store backend).
    pub fn with_store(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        ObjectStoreChunks { store, prefix: prefix.trim_matches('/').to_string(), gets: Arc::new(AtomicU64::new(0)) }
    }

    /// How many chunk GETs this client has sent (tests assert the Rust path read the chunks).
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::Relaxed)
    }

    fn path(&self, key: &str) -> ObjectPath {
        ObjectPath::from(if self.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.prefix) })
    }
}

/// The runtime the GETs run on: two threads (the work is waiting on sockets; the cores score).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("daunce-chunk-fetch")
            .enable_all()
            .build()
            .expect("a tokio runtime for chunk fetches")
    })
}

async fn get(store: Arc<dyn ObjectStore>, path: ObjectPath, key: String, gets: Arc<AtomicU64>) -> Result<Bytes, ReadError> {
    gets.fetch_add(1, Ordering::Relaxed);
    let fetched = match store.get(&path).await {
        Ok(result) => result.bytes().await,
        Err(e) => Err(e),
    };
    fetched.map_err(|e| match e {
        object_store::Error::NotFound { .. } => ReadError::Missing { key },
        e => ReadError::Fetch { key, why: e.to_string().lines().next().unwrap_or_default().to_string() },
    })
}

/// The fetched objects, in order; dropping it aborts the GETs still running.
struct Fetched {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, ReadError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Iterator for Fetched {
    type Item = Result<Chunk, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.blocking_recv().map(|r| r.map(|bytes| Chunk::Fetched { bytes, at: 0 }))
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChunkBytes for ObjectStoreChunks {
    fn fetch<'a>(&'a self, keys: Vec<String>, ahead: usize) -> Chunks<'a> {
        let ahead = ahead.max(1);
        let (tx, rx) = tokio::sync::mpsc::channel(ahead);
        let requests: Vec<_> = keys.into_iter().map(|key| (self.path(&key), key)).collect();
        let (store, gets) = (self.store.clone(), self.gets.clone());
        let task = runtime().spawn(async move {
            // In order, `ahead` in flight; the channel holds `ahead` more that the scorers have not taken.
            let mut results = futures::stream::iter(requests)
                .map(|(path, key)| get(store.clone(), path, key, gets.clone()))
                .buffered(ahead);
            while let Some(result) = results.next().await {
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    break;
                }
            }
        });
        Box::new(Fetched { rx, task })
    }
}

impl<T: ChunkBytes + Send> ChunkBytes for Arc<T> {
    fn fetch<'a>(&'a self, keys: Vec<String>, ahead: usize) -> Chunks<'a> {
        self.as_ref().fetch(keys, ahead)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use object_store::memory::InMemory;

    /// `objects` (key, bytes) put under `prefix/` of object_store's in-memory store, and a client of it.
    pub(crate) fn in_memory(prefix: &str, objects: Vec<(String, Vec<u8>)>) -> ObjectStoreChunks {
        let mem = Arc::new(InMemory::new());
        runtime().block_on(async {
            for (key, bytes) in objects {
                mem.put(&ObjectPath::from(format!("{prefix}/{key}")), bytes.into()).await.unwrap();
            }
        });
        ObjectStoreChunks::with_store(mem, prefix)
    }

    fn bytes_of(chunk: Chunk) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chunk = chunk;
        chunk.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn fetches_in_order_many_at_once_and_names_a_missing_key() {
        let objects: Vec<(String, Vec<u8>)> = (0..50).map(|i| (format!("a/c/{i}/0"), vec![i as u8; 1000 + i])).collect();
        let client = in_memory("some/store.zarr", objects.clone());
        for ahead in [1, 4, 64] {
            let keys = objects.iter().map(|(k, _)| k.clone()).collect();
            let got: Vec<Vec<u8>> = client.fetch(keys, ahead).map(|c| bytes_of(c.unwrap())).collect();
            assert_eq!(got, objects.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>());
        }
        assert_eq!(client.gets(), 150);
        let keys = vec!["a/c/0/0".to_string(), "a/c/99/0".to_string(), "a/c/1/0".to_string()];
        let mut it = client.fetch(keys, 4);
        assert_eq!(bytes_of(it.next().unwrap().unwrap()), objects[0].1);
        assert_eq!(it.next().unwrap().err(), Some(ReadError::Missing { key: "a/c/99/0".into() }));
        assert!(it.next().is_none(), "the fetches stop at the first error");
    }
}
