//! A way back to a shared object that costs nothing to copy or drop, for receipts that
//! may outlive every handle on it and are used rarely.
//!
//! An admitted request's receipt (a rate limit's [`Charge`](crate::rate_limit::Charge)) is
//! handed back only when a limit further in refuses the request, but it must be able to
//! reach its limiter then, after the service that made it may be gone. An `Arc` clone
//! made with each receipt and dropped with it is two locked instructions a request, more
//! than the rest of a limiter layer's work on some processors. Instead, the object claims
//! a [`Block`] that is never freed when it is made: a receipt holds the block's `&'static`
//! address and the claim's generation, plain words, and reaches the object through the
//! block's weak reference, under a lock, only when it is used. A dropped object's block
//! goes back to a process-wide free list for the next object made, so blocks number as
//! many as the most objects alive at once (the circuit breaker's `hot` blocks do the same
//! for its calls), and a receipt whose generation is not the block's finds nothing: it
//! never reaches an object that took over a recycled block.

use std::any::Any;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

type Target = dyn Any + Send + Sync;

/// Where objects take their blocks: the process's one pool (tests make their own).
pub(crate) static POOL: Pool = Pool::new();

/// Blocks of dropped objects, for the next objects made.
pub(crate) struct Pool {
    free: Mutex<Vec<&'static Block>>,
}

impl Pool {
    pub(crate) const fn new() -> Self {
        Self {
            free: Mutex::new(Vec::new()),
        }
    }

    /// A block for `target`, until the [`Claim`] is dropped (with the object).
    pub(crate) fn claim<T: Any + Send + Sync>(&'static self, target: Weak<T>) -> Claim {
        let block = self.free.lock().pop().unwrap_or_else(|| {
            Box::leak(Box::new(Block {
                owner: Mutex::new(Owner {
                    generation: 0,
                    target: None,
                }),
                pool: self,
            }))
        });
        let mut owner = block.owner.lock();
        owner.generation = owner.generation.wrapping_add(1);
        owner.target = Some(target);
        Claim(Lease {
            block,
            generation: owner.generation,
        })
    }

    #[cfg(test)]
    fn free_blocks(&self) -> usize {
        self.free.lock().len()
    }
}

/// A block an object holds its way back in.
pub(crate) struct Block {
    owner: Mutex<Owner>,
    /// The pool it goes back to.
    pool: &'static Pool,
}

struct Owner {
    /// Counts the claims of this block: a lease of an earlier claim finds another number.
    /// Wrapping: a receipt would have to outlive four billion objects made on one block
    /// to be mistaken.
    generation: u32,
    target: Option<Weak<Target>>,
}

/// An object's claim on a block; dropped with the object, it gives the block back.
pub(crate) struct Claim(Lease);

impl Claim {
    /// The lease receipts copy.
    #[inline(always)]
    pub(crate) fn lease(&self) -> Lease {
        self.0
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let block = self.0.block;
        // Taken out under the lock, dropped after it: a weak reference's drop may free the
        // object's allocation.
        let old = block.owner.lock().target.take();
        drop(old);
        block.pool.free.lock().push(block);
    }
}

/// A receipt's way back to the object: a `&'static` block and the claim's generation.
#[derive(Clone, Copy)]
pub(crate) struct Lease {
    block: &'static Block,
    generation: u32,
}

impl Lease {
    /// The generation, for a receipt that packs it beside another figure.
    #[inline(always)]
    pub(crate) fn generation(self) -> u32 {
        self.generation
    }

    /// The block, for the same receipt.
    #[inline(always)]
    pub(crate) fn block(self) -> &'static Block {
        self.block
    }

    /// The lease of `block` under `generation`, as [`block`](Self::block) and
    /// [`generation`](Self::generation) gave them.
    #[inline(always)]
    pub(crate) fn from_parts(block: &'static Block, generation: u32) -> Self {
        Self { block, generation }
    }

    /// The object, if the block is still its claim's and the object is alive.
    pub(crate) fn get<T: Any + Send + Sync>(self) -> Option<Arc<T>> {
        let owner = self.block.owner.lock();
        if owner.generation != self.generation {
            return None;
        }
        let target = owner.target.as_ref()?.upgrade()?;
        drop(owner);
        target.downcast::<T>().ok()
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_pool() -> &'static Pool {
        Box::leak(Box::new(Pool::new()))
    }

    #[test]
    fn a_lease_reaches_its_object_while_it_lives() {
        let pool = own_pool();
        let object = Arc::new(7u64);
        let claim = pool.claim(Arc::downgrade(&object));
        let lease = claim.lease();
        assert_eq!(lease.get::<u64>().as_deref(), Some(&7));
        // The wrong type is nothing, not a panic.
        assert!(lease.get::<u32>().is_none());
        drop(object);
        assert!(lease.get::<u64>().is_none(), "the object is gone");
        drop(claim);
        assert_eq!(pool.free_blocks(), 1);
    }

    #[test]
    fn a_recycled_block_is_not_reached_by_an_earlier_lease() {
        let pool = own_pool();
        let first = Arc::new(1u64);
        let claim = pool.claim(Arc::downgrade(&first));
        let old = claim.lease();
        drop(claim);
        drop(first);
        let second = Arc::new(2u64);
        let claim = pool.claim(Arc::downgrade(&second));
        // The same block, taken over.
        assert!(std::ptr::eq(claim.lease().block(), old.block()));
        assert_eq!(claim.lease().get::<u64>().as_deref(), Some(&2));
        assert!(old.get::<u64>().is_none(), "an earlier claim's lease");
        let rebuilt = Lease::from_parts(old.block(), old.generation());
        assert!(rebuilt.get::<u64>().is_none());
    }

    proptest::proptest! {
        /// Any sequence of objects made and dropped, and leases of them kept: a lease
        /// reaches its own object exactly while that object lives, never another one made
        /// on its recycled block, and the blocks made number the most objects alive at once.
        #[test]
        fn a_lease_reaches_its_object_and_no_other(
            ops in proptest::collection::vec((0u8..3, 0usize..8), 1..200)
        ) {
            let pool = own_pool();
            // Alive objects: their value, Arc and claim. Every lease ever made, with the
            // value of its object.
            let mut alive: Vec<(u64, Arc<u64>, Claim)> = Vec::new();
            let mut leases: Vec<(Lease, u64)> = Vec::new();
            let (mut next, mut most, mut blocks) = (0u64, 0usize, std::collections::HashSet::new());
            for (op, n) in ops {
                match op {
                    0 => {
                        let object = Arc::new(next);
                        let claim = pool.claim(Arc::downgrade(&object));
                        blocks.insert(claim.lease().block() as *const Block as usize);
                        leases.push((claim.lease(), next));
                        alive.push((next, object, claim));
                        next += 1;
                        most = most.max(alive.len());
                    }
                    1 if !alive.is_empty() => {
                        let (_, object, claim) = alive.remove(n % alive.len());
                        // In the order an object's own drop takes: the last strong
                        // reference, then its fields (the claim).
                        drop(object);
                        drop(claim);
                    }
                    _ if !leases.is_empty() => {
                        let (lease, value) = leases[n % leases.len()];
                        let lives = alive.iter().any(|(v, ..)| *v == value);
                        let got = lease.get::<u64>().map(|o| *o);
                        proptest::prop_assert_eq!(got, lives.then_some(value));
                    }
                    _ => {}
                }
            }
            proptest::prop_assert!(blocks.len() <= most.max(1));
        }
    }

    #[test]
    fn blocks_number_the_most_objects_alive_at_once() {
        let pool = own_pool();
        for _ in 0..1000 {
            let object = Arc::new(0u8);
            let _claims = [
                pool.claim(Arc::downgrade(&object)),
                pool.claim(Arc::downgrade(&object)),
            ];
        }
        assert_eq!(pool.free_blocks(), 2);
    }
}
