// p2prc render example: three balls circle a glass sphere over a checkered floor while
// the camera swings round. POV-Ray's `clock` runs 0..1 over the animation (+KFI/+KFF/+KC
// on the command line); each rank renders only its frames (+SF/+EF). No #include needed.
#version 3.7;
global_settings { assumed_gamma 1.0 max_trace_level 8 }

#declare T = clock * 2 * pi;
#declare Ball = array[3] { rgb <0.95, 0.25, 0.2>, rgb <0.2, 0.8, 0.3>, rgb <0.25, 0.45, 1> }

camera {
  location <7 * sin(T / 3), 3.2 + 0.6 * sin(T), -7 * cos(T / 3)>
  look_at <0, 0.9, 0>
  angle 48
}
light_source { <-5, 10, -6> color rgb 1.1 }
light_source { <6, 5, -3> color rgb 0.35 shadowless }

sky_sphere {
  pigment {
    gradient y
    color_map { [0 color rgb <0.95, 0.97, 1>] [0.6 color rgb <0.35, 0.55, 0.9>] }
  }
}

plane {
  y, 0
  pigment { checker color rgb 0.85 color rgb 0.12 }
  finish { diffuse 0.8 reflection 0.12 }
}

sphere {
  <0, 1.1, 0>, 1.1
  pigment { color rgbf <0.92, 0.96, 1, 0.85> }
  finish { phong 0.9 phong_size 80 reflection 0.08 }
  interior { ior 1.45 }
}

#declare I = 0;
#while (I < 3)
  #declare A = T + I * 2 * pi / 3;
  sphere {
    <2.6 * cos(A), 0.45 + 0.9 * abs(sin(1.5 * A)), 2.6 * sin(A)>, 0.45
    pigment { color Ball[I] }
    finish { phong 0.6 reflection 0.15 }
  }
  #declare I = I + 1;
#end
