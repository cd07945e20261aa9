{
  "targets": [
    {
      "target_name": "quiver_shm",
      "sources": ["shm_core.c", "region_core.c", "fork_core.c", "fork_platform.cc", "binding.c"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"],
      "libraries": ["-lpthread"],
      "cflags_c": ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    }
  ]
}
