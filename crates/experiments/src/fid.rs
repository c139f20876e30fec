//! FID and KID with the Inception-v3 network from the data cache.
