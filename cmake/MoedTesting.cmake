if(MOED_TESTS)
  include(Catch)
endif()

# moed_add_test(NAME SOURCES a.cc b.cc LIBS x y [LABELS unit])
# One Catch2 executable; each TEST_CASE becomes its own ctest test.
function(moed_add_test name)
  if(NOT MOED_TESTS)
    return()
  endif()
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS;LABELS" ${ARGN})
  if(NOT ARG_LABELS)
    set(ARG_LABELS unit)
  endif()
  add_executable(${name} ${ARG_SOURCES})
  # Every test may make a backend (kernels/test_backend.h): the factory is an executable's.
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} moed_backends Catch2::Catch2WithMain)
  # -w NoTests: a ctest test whose filter matches no test case fails instead of passing empty
  # (a ';' in a test case's name, which CMake splits, once hid ten tests that way).
  catch_discover_tests(${name}
    TEST_PREFIX "${name}:"
    EXTRA_ARGS -w NoTests
    PROPERTIES LABELS "${ARG_LABELS}"
               ENVIRONMENT "MOED_SHARED_DIR=${MOED_SHARED_DIR};MOED_BUILD_DIR=${CMAKE_BINARY_DIR}")
endfunction()
