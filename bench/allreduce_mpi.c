/* The OpenMPI side of `bench/run allreduce`: MPI_Allreduce (sum, in place) of float
 * buffers of the given sizes in MB, timed over ITERS calls after one warm-up; prints
 * one JSON line per size from rank 0 (the slowest rank's time). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int iters = argc > 1 ? atoi(argv[1]) : 20;
    for (int a = 2; a < argc; a++) {
        double mb = atof(argv[a]);
        long n = (long)(mb * 1048576.0) / 4;
        float *buf = malloc(n * sizeof(float));
        for (long i = 0; i < n; i++) buf[i] = 1.0f;
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int k = 0; k < iters; k++)
            MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        double t = (MPI_Wtime() - t0) / iters, worst;
        MPI_Reduce(&t, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        if (rank == 0) {
            double bytes = (double)n * 4.0;
            double bus = 2.0 * (size - 1) / size * bytes / worst;
            printf("{\"bytes\": %.0f, \"seconds\": %.9f, \"bus_gbps\": %.6f, \"ranks\": %d}\n", bytes, worst, bus / 1e9, size);
            fflush(stdout);
        }
        free(buf);
    }
    MPI_Finalize();
    return 0;
}
