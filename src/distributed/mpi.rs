//! [`Collective`] over MPI (the `mpi` crate): processes on one host or many.

use ::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use ::mpi::datatype::PartitionMut;
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator, SimpleCommunicator};
use ::mpi::{Count, Threading};

use super::{check_root, Collective, DEFAULT_BUCKET_ELEMS};
use crate::{Error, Result};

/// MPI ranks: each process started by `mpirun -np N` (or `srun`) is one rank of the world
/// communicator.
///
/// [`Mpi::init`] initialises MPI (once per process; MPI is finalised when the owning `Mpi`
/// is dropped). Without a launcher the program is a world of one, and behaves as with
/// [`SingleProcess`](super::SingleProcess). MPI is called from the thread that created
/// the `Mpi` only (`MPI_THREAD_FUNNELED`), so the type is neither `Send` nor `Sync`.
///
/// ```no_run
/// use pgrpo::distributed::{Collective, Mpi};
/// let mpi = Mpi::init()?;
/// println!("rank {} of {}", mpi.rank(), mpi.world());
/// # Ok::<(), pgrpo::Error>(())
/// ```
pub struct Mpi {
    comm: SimpleCommunicator,
    bucket_elems: usize,
    // Dropped after `comm`: finalises MPI.
    _universe: Option<Universe>,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.rank())
            .field("world", &self.world())
            .field("bucket_elems", &self.bucket_elems)
            .finish()
    }
}

impl Mpi {
    /// Initialises MPI and returns the world communicator.
    ///
    /// # Errors
    /// [`Error::Distributed`] if MPI was already initialised in this process (use
    /// [`Mpi::from_communicator`] then) or does not provide `MPI_THREAD_FUNNELED`.
    pub fn init() -> Result<Self> {
        let (universe, level) = ::mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| Error::distributed("MPI was already initialised"))?;
        if level < Threading::Funneled {
            return Err(Error::distributed(format!(
                "the MPI library provides thread level {level:?}, pgrpo needs Funneled"
            )));
        }
        let comm = universe.world();
        Ok(Self {
            comm,
            bucket_elems: DEFAULT_BUCKET_ELEMS,
            _universe: Some(universe),
        })
    }

    /// A communicator of an MPI environment initialised elsewhere (e.g. a sub-communicator
    /// of ranks that train together). The caller keeps its `Universe` alive while this is in
    /// use.
    pub fn from_communicator(comm: SimpleCommunicator) -> Self {
        Self {
            comm,
            bucket_elems: DEFAULT_BUCKET_ELEMS,
            _universe: None,
        }
    }

    /// Sets the largest gradient bucket (in `f32` elements, at least 1). Smaller buckets
    /// take less extra memory (two copies of a bucket exist during the all-reduce), larger
    /// ones fewer calls.
    pub fn with_bucket_elems(mut self, elems: usize) -> Self {
        self.bucket_elems = elems.max(1);
        self
    }

    /// The communicator.
    pub fn communicator(&self) -> &SimpleCommunicator {
        &self.comm
    }

    /// Stops every rank of the job with `code` (`MPI_Abort`): for an error outside a
    /// training step, where the other ranks would otherwise wait forever.
    pub fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
}

/// `len` as an MPI count, or an error naming the operation.
fn count(len: usize, what: &str) -> Result<Count> {
    Count::try_from(len).map_err(|_| {
        Error::distributed(format!(
            "{what}: {len} elements exceed MPI's count limit ({}); use smaller buckets",
            Count::MAX
        ))
    })
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn world(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        if self.world() == 1 || buf.is_empty() {
            return Ok(());
        }
        count(buf.len(), "all-reduce")?;
        let send = buf.to_vec();
        self.comm
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world())?;
        if self.world() == 1 || buf.is_empty() {
            return Ok(());
        }
        count(buf.len(), "broadcast")?;
        self.comm
            .process_at_rank(root as ::mpi::Rank)
            .broadcast_into(buf);
        Ok(())
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.world();
        if n == 1 {
            return Ok(vec![local.to_vec()]);
        }
        let mine = count(local.len(), "all-gather")?;
        let mut counts: Vec<Count> = vec![0; n];
        self.comm.all_gather_into(&mine, &mut counts[..]);
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        count(total, "all-gather")?;
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |acc: &mut Count, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let mut all = vec![0u8; total];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.comm.all_gather_varcount_into(local, &mut part);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
            .collect())
    }

    fn barrier(&self) -> Result<()> {
        self.comm.barrier();
        Ok(())
    }

    fn bucket_elems(&self) -> usize {
        self.bucket_elems
    }
}
