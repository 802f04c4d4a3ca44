//! The `pagedserve` command line.

fn main() {
    println!("pagedserve");
}
