pub mod batch;
pub mod block_pool;
